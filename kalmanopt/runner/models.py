"""The models the runner trains, defined here so that torchvision stays optional.

- :class:`MLP` and :class:`DigitsCNN` for the 8×8 digits;
- :class:`GPT`, a small causal transformer for byte-level language modelling;
- :class:`CifarResNet` (ResNet-18 and ResNet-50 in their CIFAR form: a 3×3 stem, no max-pool);
- :class:`LinearModel` for the least-squares problem.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "DigitsCNN", "GPT", "CifarResNet", "LinearModel", "resnet18", "resnet50"]


class MLP(nn.Module):
    """A multi-layer perceptron on flattened inputs.

    Args:
        in_features: size of one flattened input.
        num_classes: number of outputs.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
        activation: ``"relu"`` or ``"tanh"``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, depth: int = 1,
                 activation: str = "relu") -> None:
        super().__init__()
        activations = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in activations:
            raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(activations)}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activations[activation]()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of inputs of any shape (flattened after the batch dimension)."""
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    """A small convolutional network for 8×8 single-channel images.

    Args:
        num_classes: number of outputs.
        channels: channels of the first convolution (the second has twice as many).
    """

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * channels * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images of shape (batch, 64) or (batch, 1, 8, 8)."""
        x = x.reshape(x.shape[0], 1, 8, 8)
        return self.head(self.features(x).flatten(1))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the sequence dimension of ``x`` (batch, time, d_model)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """A pre-norm transformer block: attention and an MLP, each with a residual connection."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=bias), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=bias), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        """x + attn(ln(x)), then + mlp(ln(x))."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: token and position embeddings, causal blocks, a tied output layer.

    With ``d_model=384, n_layer=6, n_head=6, dropout=0.2, bias=False`` and a context of 256 it is
    nanoGPT's shakespeare-char model.

    Args:
        vocab_size: number of symbols (256 for bytes).
        block_size: the longest context.
        d_model: embedding width.
        n_layer: number of blocks.
        n_head: attention heads per block.
        dropout: dropout after the embeddings, on the attention weights and on each residual branch.
        bias: biases in the linear layers and layer norms.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 64, d_model: int = 128, n_layer: int = 2,
                 n_head: int = 4, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.block_size = block_size
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(d_model, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(d_model, bias=bias)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-symbol logits (batch, time, vocab) for symbols ``idx`` (batch, time)."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.blocks(self.drop(self.token(idx) + self.position(pos)))
        return self.head(self.ln(x))


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/34."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """The 1×1–3×3–1×1 residual block of ResNet-50 and deeper."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        """The bottleneck path plus the shortcut, then relu."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class CifarResNet(nn.Module):
    """ResNet in its CIFAR form: a 3×3 stride-1 stem without max-pool, four stages, global pooling.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage (ResNet-18: 2, 2, 2, 2; ResNet-50: 3, 4, 6, 3).
        num_classes: number of outputs.
        width: channels of the first stage (64 in the standard networks; smaller for tests).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, ...],
                 num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, n in enumerate(num_blocks):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, 2 if (j == 0 and i > 0) else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images (batch, 3, H, W)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet-18, CIFAR form."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, width)


def resnet50(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet-50, CIFAR form."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, width)


class LinearModel(nn.Module):
    """θ ↦ Aθ: a linear map without bias, the unknown of a least-squares problem.

    Args:
        dim: number of unknowns.
        init_scale: standard deviation of the random initial θ.
    """

    def __init__(self, dim: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim) * init_scale)

    def forward(self, a: Tensor) -> Tensor:
        """The predictions a·θ for rows ``a`` (batch, dim)."""
        return a @ self.theta
