"""Tasks: a dataset, the models that fit it, the per-sample loss and the validation figures.

A task is registered by name with :func:`register_task`; ``kalmanopt list`` shows them. Each
loads its data once per grid (the split is fixed, so every run sees the same validation set) and
keeps it as tensors on the training device.

- ``digits``: scikit-learn's 8×8 handwritten digits (shipped with scikit-learn), MLP or CNN.
- ``text``: byte-level language modelling with a small GPT, on a text file or, without one, on
  Python's own standard-library sources.
- ``cifar10`` / ``cifar100``: the CIFAR archives in their python format from a local folder.
- ``quadratic``: an ill-conditioned least-squares problem with a known optimum.
"""

from __future__ import annotations

import inspect
import math
import pickle
import sysconfig
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kalmanopt.registry import load_plugins
from kalmanopt.runner import models
from kalmanopt.runner.errors import ConfigError, Problems

__all__ = ["Dataset", "Task", "TASKS", "register_task", "get_task", "stdlib_corpus"]

#: task name -> task instance
TASKS: dict[str, Task] = {}


@dataclass
class Dataset:
    """A task's data as tensors.

    Attributes:
        train_inputs, train_targets, val_inputs, val_targets: the split.
        info: what models need to fit the data (``num_classes``, ``in_features``, ``vocab_size``,
            ``block_size``) and task constants (``optimum`` for the least-squares problem).
    """

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Dataset:
        """The same data on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.info.items()}
        train_inputs = self.train_inputs.to(device)
        # a language task's inputs and targets are one stream: keep one copy
        train_targets = train_inputs if self.train_targets is self.train_inputs else self.train_targets.to(device)
        return Dataset(train_inputs, train_targets, self.val_inputs.to(device), self.val_targets.to(device), moved)


class Task(ABC):
    """What the runner needs to know about a task.

    Attributes:
        name: the name configs use.
        kind: ``"classification"``, ``"language"`` or ``"regression"``; it decides the
            validation figures (accuracy, perplexity, distance to the optimum).
        doc: one line for ``kalmanopt list``.
        models: model name -> builder ``(data, **model_options) -> nn.Module``.
        default_model: the model used when the config names none.
        options: the task's options with their defaults (``data`` is the ``--data`` path).
        quick_options: overrides applied by ``--quick``.
        loss_statistic: the loss statistic the Kalman optimizers' online R follows by default.
    """

    name: str = ""
    kind: str = "classification"
    doc: str = ""
    models: dict[str, Callable[..., nn.Module]] = {}
    default_model: str = ""
    options: dict[str, Any] = {}
    quick_options: dict[str, Any] = {}
    loss_statistic: str = "second_moment"

    # ---------------------------------------------------------------- checks before training
    #: types of options whose default is ``None`` (others take the type of their default)
    option_types: dict[str, tuple[type, ...]] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; unknown names, wrong types or a missing data path raise ConfigError."""
        unknown = set(options) - set(self.options)
        if "data" in unknown:
            readers = ", ".join(sorted(n for n, t in TASKS.items() if "data" in t.options))
            raise ConfigError(f"task {self.name!r} takes no data path (--data): it makes or ships its own data; "
                              f"tasks that read one: {readers}")
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} for task {self.name!r}; valid options: "
                              f"{', '.join(sorted(self.options)) or '(none)'}")
        problems = Problems()
        for name, value in options.items():
            default = self.options[name]
            types = self.option_types.get(name) or (() if default is None else _types_of(default))
            if types and value is not None and not _is_a(value, types):
                problems.add(f"task {self.name!r}: option {name} must be {_type_names(types)}, got {value!r}")
        problems.raise_if_any()
        return {**self.options, **options}

    def check_model(self, model: str, model_options: dict[str, Any]) -> None:
        """Raise ConfigError for an unknown model or model option."""
        if model not in self.models:
            raise ConfigError(f"unknown model {model!r} for task {self.name!r}; valid models: "
                              f"{', '.join(sorted(self.models))}")
        valid = model_keywords(self.models[model])
        unknown = set(model_options) - set(valid)
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} for model {model!r}; valid options: "
                              f"{', '.join(sorted(valid)) or '(none)'}")
        problems = Problems()
        for name, value in model_options.items():
            types = _types_of(valid[name])
            if types and not _is_a(value, types):
                problems.add(f"model {model!r}: option {name} must be {_type_names(types)}, got {value!r}")
        problems.raise_if_any()

    # ---------------------------------------------------------------- data and model
    @abstractmethod
    def load(self, options: dict[str, Any]) -> Dataset:
        """Load (or make) the data; ``options`` are complete (see :meth:`check_options`)."""

    def build_model(self, model: str, data: Dataset, model_options: dict[str, Any]) -> nn.Module:
        """A freshly initialised model (seed the RNG first)."""
        return self.models[model](data, **model_options)

    def steps_per_epoch(self, data: Dataset, batch_size: int) -> int:
        """Minibatches in one pass over the training data (the last partial one included)."""
        return max(1, math.ceil(len(data.train_targets) / batch_size))

    def batches(self, data: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled minibatches ``(inputs, targets)``."""
        n = len(data.train_targets)
        order = torch.randperm(n, generator=generator).to(data.train_targets.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.prepare(data.train_inputs[idx], data, generator, train=True), data.train_targets[idx]

    def prepare(self, inputs: Tensor, data: Dataset, generator: torch.Generator, train: bool) -> Tensor:
        """Turn stored inputs into model inputs (normalisation, augmentation); identity by default."""
        return inputs

    @abstractmethod
    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """One loss per sample (the Kalman optimizers' R follows their statistic)."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
        """The validation figures: ``val_loss`` and the task's own (accuracy, perplexity, distance)."""
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        generator = torch.Generator().manual_seed(0)
        for start in range(0, len(data.val_targets), batch_size):
            x = self.prepare(data.val_inputs[start:start + batch_size], data, generator, train=False)
            y = data.val_targets[start:start + batch_size]
            out = model(x)
            total += float(self.per_sample_loss(out, y).sum())
            if self.kind == "classification":
                correct += int((out.argmax(-1) == y).sum())
            count += len(y)
        model.train(was_training)
        val_loss = total / max(count, 1)
        figures = {"val_loss": val_loss}
        if self.kind == "classification":
            figures["val_accuracy"] = correct / max(count, 1)
            figures["val_error"] = 1.0 - figures["val_accuracy"]
        return figures


def _types_of(default: Any) -> tuple[type, ...]:
    """The types a value may take where ``default`` is the default: a float also takes an int."""
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, (int, str)):
        return (type(default),)
    return ()


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if types == (int, float):
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def model_keywords(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """The options a model builder accepts (every keyword after ``data``), with defaults."""
    params = list(inspect.signature(builder).parameters.values())[1:]
    return {p.name: p.default for p in params}


def register_task(task: Task) -> Task:
    """Register ``task`` under ``task.name`` (replacing one of the same name)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``; an unknown name raises ConfigError listing the valid ones.

    Plugins (the ``kalmanopt.plugins`` entry points) are loaded first, so they can register tasks.
    """
    load_plugins()
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


def _split(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def _check_fraction(options: dict[str, Any], task: str) -> None:
    if not 0.0 < float(options["val_fraction"]) < 1.0:
        raise ConfigError(f"task {task!r}: val_fraction must lie in (0, 1), got {options['val_fraction']!r}")


def _cap(x: Tensor, y: Tensor, limit: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if not limit else (x[:limit], y[:limit])


# ==================================================================== digits
def _digits_mlp(data: Dataset, hidden: int = 128, depth: int = 1, activation: str = "relu") -> nn.Module:
    return models.MLP(data.info["in_features"], data.info["num_classes"], hidden, depth, activation)


def _digits_cnn(data: Dataset, channels: int = 16) -> nn.Module:
    return models.DigitsCNN(data.info["num_classes"], channels)


class DigitsTask(Task):
    """scikit-learn's handwritten digits: 1797 images of 8×8 pixels, 10 classes."""

    name = "digits"
    kind = "classification"
    doc = "scikit-learn's 8x8 handwritten digits (ships with scikit-learn), 10 classes; val split 20 %"
    models = {"mlp": _digits_mlp, "cnn": _digits_cnn}
    default_model = "mlp"
    options = {"val_fraction": 0.2, "max_train": None}
    option_types = {"max_train": (int,)}
    quick_options: dict[str, Any] = {}

    def load(self, options: dict[str, Any]) -> Dataset:
        """Pixels scaled to [0, 1]; a fixed stratified-by-chance split."""
        _check_fraction(options, self.name)
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover - the runner extra installs it
            raise ConfigError("task 'digits' needs scikit-learn: pip install 'kalmanopt[runner]'") from None
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val = _split(len(y), options["val_fraction"])
        xt, yt = _cap(x[train], y[train], options["max_train"])
        return Dataset(xt, yt, x[val], y[val], {"in_features": 64, "num_classes": 10})

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy per sample."""
        return F.cross_entropy(outputs, targets, reduction="none")


# ==================================================================== text
def stdlib_corpus(max_bytes: int) -> bytes:
    """Python's own standard-library sources, concatenated in sorted order up to ``max_bytes``.

    A corpus every Python installation has, so the ``text`` task runs anywhere without a download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        chunks.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if not corpus:
        raise ConfigError(f"no Python sources found under {root} for the default text corpus; pass --data FILE")
    return corpus


def _gpt(data: Dataset, d_model: int = 128, n_layer: int = 2, n_head: int = 4, dropout: float = 0.0,
         bias: bool = True) -> nn.Module:
    return models.GPT(data.info["vocab_size"], data.info["block_size"], d_model, n_layer, n_head, dropout, bias)


def _read_text_file(path: Path, max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of the ``--data`` file of the text task (no more is read: a huge file
    costs no memory beyond them); ConfigError (one line) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes)
    except OSError as exc:
        raise ConfigError(f"task 'text': cannot read the data file {str(path)!r} ({exc.strerror or exc}); "
                          "pass --data FILE, a readable text file") from None


def _smallest_corpus(block: int, val_fraction: float) -> int:
    """The fewest bytes a corpus needs: a validation tail and a training head of ``block + 1`` each."""
    n = 2 * (block + 1)
    while n - max(block + 1, int(n * val_fraction)) < block + 1:
        n += 1
    return n


def _check_text_file(path: Path, block: int, val_fraction: Any, max_bytes: int) -> None:
    """The upfront check of the text task's data file: readable, not empty, long enough for a block.

    (Binary content is valid: the ``bytes`` vocabulary reads any bytes, ``chars`` decodes with
    replacement characters.)
    """
    try:
        with open(path, "rb") as f:
            head = f.read(min(max_bytes, 1 << 24))
    except OSError as exc:
        raise ConfigError(f"task 'text': cannot read the data file {str(path)!r} ({exc.strerror or exc}); "
                          "pass --data FILE, a readable text file") from None
    if not head:
        raise ConfigError(f"task 'text': the data file {str(path)!r} is empty; pass --data FILE with a text "
                          "(e.g. path/to/tinyshakespeare.txt)")
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        return  # (the task's own fraction check reports it)
    if 0.0 < fraction < 1.0 and block >= 1:
        needed = _smallest_corpus(block, fraction)
        if len(head) < needed:
            raise ConfigError(f"task 'text': the data file {str(path)!r} has {len(head)} bytes, too few for "
                              f"block_size {block} and a validation split (at least {needed}); use a longer "
                              "file or a smaller block_size")


class TextTask(Task):
    """Byte-level language modelling: predict each next byte of a text."""

    name = "text"
    kind = "language"
    doc = ("language model (small GPT) on the bytes or characters of --data FILE; without one, on Python's "
           "standard-library sources")
    models = {"gpt": _gpt}
    default_model = "gpt"
    options = {"data": None, "block_size": 64, "max_bytes": 1_000_000, "val_fraction": 0.1, "max_val_windows": 256,
               "vocab": "bytes", "require_data": False}
    option_types = {"data": (str,)}
    quick_options = {"max_bytes": 100_000, "max_val_windows": 32}
    loss_statistic = "variance"  # the authors' language-model code feeds R the loss variance

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults; the data file, when given (or required), must exist."""
        options = super().check_options(options)
        if options["vocab"] not in ("bytes", "chars"):
            raise ConfigError(f"task 'text': vocab must be 'bytes' (256 symbols) or 'chars' (the characters of "
                              f"the corpus, as nanoGPT's shakespeare-char), got {options['vocab']!r}")
        if options["require_data"] and options["data"] is None:
            raise ConfigError("this config trains on a given text: pass --data FILE (e.g. "
                              "path/to/tinyshakespeare.txt)")
        if options["data"] is not None and not Path(options["data"]).is_file():
            raise ConfigError(f"task 'text': data file {str(options['data'])!r} not found; pass --data FILE "
                              "(a text file, e.g. path/to/tinyshakespeare.txt) or leave it out to "
                              "use Python's standard-library sources")
        if options["data"] is not None:
            _check_text_file(Path(options["data"]), int(options["block_size"]), options["val_fraction"],
                             int(options["max_bytes"]))
        return options

    def load(self, options: dict[str, Any]) -> Dataset:
        """The byte stream split into a training head and a validation tail."""
        _check_fraction(options, self.name)
        block = int(options["block_size"])
        raw = _read_text_file(Path(options["data"]), int(options["max_bytes"])) if options["data"] else \
            stdlib_corpus(options["max_bytes"])
        vocab_size = 256
        if options["vocab"] == "chars":  # nanoGPT's character vocabulary: the corpus's characters, sorted
            text = raw.decode("utf-8", errors="replace")
            chars = sorted(set(text))
            index = {c: i for i, c in enumerate(chars)}
            stream = torch.tensor([index[c] for c in text], dtype=torch.long)
            vocab_size = len(chars)
        else:  # (torch.frombuffer refuses an empty buffer: the length check below says what is wrong)
            stream = torch.tensor(list(raw), dtype=torch.long) if not raw else \
                torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        n_val = max(block + 1, int(len(stream) * options["val_fraction"]))
        if len(stream) - n_val < block + 1:
            raise ConfigError(f"task 'text': the corpus has {len(stream)} bytes, too few for block_size {block} "
                              "and a validation split; use a longer file or a smaller block_size")
        train, val = stream[:-n_val], stream[-n_val:]
        n_windows = min((len(val) - 1) // block, int(options["max_val_windows"]))
        val_x = torch.stack([val[i * block:(i + 1) * block] for i in range(n_windows)])
        val_y = torch.stack([val[i * block + 1:(i + 1) * block + 1] for i in range(n_windows)])
        return Dataset(train, train, val_x, val_y, {"vocab_size": vocab_size, "block_size": block})

    def steps_per_epoch(self, data: Dataset, batch_size: int) -> int:
        """Windows of ``block_size`` bytes in the training stream, divided by the batch size."""
        return max(1, (len(data.train_inputs) - 1) // (data.info["block_size"] * batch_size))

    def batches(self, data: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """Windows at random offsets: inputs and the same bytes shifted by one."""
        block = data.info["block_size"]
        stream = data.train_inputs
        offsets = torch.arange(block, device=stream.device)
        for _ in range(self.steps_per_epoch(data, batch_size)):
            starts = torch.randint(0, len(stream) - block - 1, (batch_size, 1), generator=generator)
            idx = starts.to(stream.device) + offsets
            yield stream[idx], stream[idx + 1]

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean next-byte cross-entropy of each sequence."""
        tokens = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
        return tokens.view(targets.shape).mean(dim=1)

    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
        """Validation loss per byte (nats) and its perplexity."""
        figures = super().evaluate(model, data, batch_size)
        figures["val_perplexity"] = math.exp(min(figures["val_loss"], 50.0))
        return figures


# ==================================================================== CIFAR
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _resnet18(data: Dataset, width: int = 64) -> nn.Module:
    return models.resnet18(data.info["num_classes"], width)


def _resnet50(data: Dataset, width: int = 64) -> nn.Module:
    return models.resnet50(data.info["num_classes"], width)


def _unpickle(path: Path) -> dict:
    """One batch file of the CIFAR python-format archive; ConfigError (one line) if it is not one."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except Exception as exc:  # garbage, a truncated download: pickle raises many kinds
        raise ConfigError(f"{str(path)!r} is not a CIFAR python-format batch (unpickling failed: "
                          f"{type(exc).__name__}); download the python version of the archive again") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"{str(path)!r} is not a CIFAR python-format batch (it holds a {type(batch).__name__}, "
                          "not a dict)")
    return batch


class CifarTask(Task):
    """CIFAR-10 or CIFAR-100 from the python-format archive in a local folder (no download)."""

    kind = "classification"
    models = {"resnet18": _resnet18, "resnet50": _resnet50}
    default_model = "resnet18"
    options = {"data": None, "augment": True, "max_train": None, "max_val": None}
    option_types = {"data": (str,), "max_train": (int,), "max_val": (int,)}
    quick_options = {"max_train": 512, "max_val": 256}

    def __init__(self, name: str, folder: str, num_classes: int, train_files: tuple[str, ...], test_file: str,
                 label_key: bytes) -> None:
        self.name = name
        self.folder = folder
        self.num_classes = num_classes
        self.train_files = train_files
        self.test_file = test_file
        self.label_key = label_key
        self.doc = (f"CIFAR-{num_classes} from --data DIR holding {folder}/ (python format, no download); "
                    "ResNet-18/50 in CIFAR form")

    def archive(self, data: str | Path | None) -> Path:
        """The archive folder under (or at) ``data``; ConfigError if it is missing or incomplete."""
        hint = (f"pass --data DIR, the folder that holds {self.folder}/ (the CIFAR python-format archive; "
                "kalmanopt does not download it)")
        if data is None:
            raise ConfigError(f"task {self.name!r} needs its data: {hint}")
        root = Path(data)
        folder = root if root.name == self.folder else root / self.folder
        if not folder.is_dir():
            raise ConfigError(f"task {self.name!r}: {str(folder)!r} not found; {hint}")
        missing = [f for f in (*self.train_files, self.test_file) if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"task {self.name!r}: {str(folder)!r} lacks {', '.join(missing)}; {hint}")
        return folder

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults; the archive must exist."""
        options = super().check_options(options)
        self.archive(options["data"])
        return options

    def _read(self, paths: list[Path]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for path in paths:
            batch = _unpickle(path)
            try:
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch[self.label_key])
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{str(path)!r} is not a CIFAR python-format batch ({type(exc).__name__}: "
                                  f"{exc}); download the python version of the archive again") from None
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)

    def load(self, options: dict[str, Any]) -> Dataset:
        """Images kept as uint8 (normalised per batch), the archive's own train/test split."""
        folder = self.archive(options["data"])
        xt, yt = self._read([folder / f for f in self.train_files])
        xv, yv = self._read([folder / self.test_file])
        xt, yt = _cap(xt, yt, options["max_train"])
        xv, yv = _cap(xv, yv, options["max_val"])
        return Dataset(xt, yt, xv, yv, {"num_classes": self.num_classes, "augment": bool(options["augment"])})

    def prepare(self, inputs: Tensor, data: Dataset, generator: torch.Generator, train: bool) -> Tensor:
        """uint8 images to normalised floats; random crop and flip while training."""
        x = inputs.float().div_(255.0)
        mean = torch.tensor(_CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_CIFAR_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if train and data.info["augment"]:
            n = x.shape[0]
            padded = F.pad(x, (4, 4, 4, 4))
            dx, dy = torch.randint(0, 9, (2, n), generator=generator).tolist()
            flips = torch.rand(n, generator=generator) < 0.5
            crops = [padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)]
            x = torch.stack(crops)
            x[flips.to(x.device)] = x[flips.to(x.device)].flip(-1)
        return x

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy per sample."""
        return F.cross_entropy(outputs, targets, reduction="none")


# ==================================================================== quadratic
def _linear(data: Dataset, init_scale: float = 1.0) -> nn.Module:
    return models.LinearModel(data.info["dim"], init_scale)


class QuadraticTask(Task):
    """Least squares min_θ ½ mean_i (a_i·θ − b_i)² with ill-conditioned rows and a known optimum.

    The rows a_i are Gaussian with covariance eigenvalues log-spaced over ``condition`` (the
    condition number of the Hessian); b_i = a_i·θ_true + noise. The optimum θ* is the exact
    least-squares solution on the training rows, so the distance ‖θ − θ*‖ can be tracked.
    """

    name = "quadratic"
    kind = "regression"
    doc = "ill-conditioned least squares with a known optimum (distance-to-optimum plot)"
    models = {"linear": _linear}
    default_model = "linear"
    options = {"dim": 20, "samples": 1000, "condition": 100.0, "noise": 0.1, "val_fraction": 0.2}
    quick_options: dict[str, Any] = {}

    def load(self, options: dict[str, Any]) -> Dataset:
        """Rows, targets and θ* (float64 solve, stored as float32)."""
        _check_fraction(options, self.name)
        dim, n, cond = int(options["dim"]), int(options["samples"]), float(options["condition"])
        if dim < 1 or n < 2 or cond < 1.0:
            raise ConfigError(f"task 'quadratic': need dim >= 1, samples >= 2, condition >= 1; got "
                              f"dim={dim}, samples={n}, condition={cond}")
        rng = np.random.default_rng(0)
        scales = np.sqrt(np.logspace(0.0, -np.log10(cond), dim))
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        rows = (rng.standard_normal((n, dim)) * scales) @ basis.T
        theta_true = rng.standard_normal(dim)
        targets = rows @ theta_true + float(options["noise"]) * rng.standard_normal(n)
        train, val = _split(n, options["val_fraction"])
        optimum = np.linalg.lstsq(rows[train], targets[train], rcond=None)[0]
        residual = rows[train] @ optimum - targets[train]
        as32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        return Dataset(as32(rows[train]), as32(targets[train]), as32(rows[val]), as32(targets[val]),
                       {"dim": dim, "optimum": as32(optimum), "optimal_loss": float(0.5 * np.mean(residual ** 2))})

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """½ (a·θ − b)² per row."""
        return 0.5 * (outputs - targets) ** 2

    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
        """Validation loss, the distance ‖θ − θ*‖ and the excess training loss over the optimum."""
        figures = super().evaluate(model, data, batch_size)
        with torch.no_grad():
            theta = torch.cat([p.detach().flatten() for p in model.parameters()])
            figures["distance_to_optimum"] = float((theta - data.info["optimum"]).norm())
            train_loss = float(self.per_sample_loss(model(data.train_inputs), data.train_targets).mean())
            figures["excess_train_loss"] = train_loss - data.info["optimal_loss"]
        return figures


register_task(DigitsTask())
register_task(TextTask())
register_task(CifarTask("cifar10", "cifar-10-batches-py", 10,
                        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels"))
register_task(CifarTask("cifar100", "cifar-100-python", 100, ("train",), "test", b"fine_labels"))
register_task(QuadraticTask())
