"""The runner's torch baselines: every torch.optim optimizer by name, Muon paired with AdamW, logspace sweeps."""

import copy

import pytest
import torch
from torch import nn

from kalmanopt.runner import ConfigError
from kalmanopt.runner.models import GPT, MLP, DigitsCNN
from kalmanopt.runner.muon import MuonWithAdamW, muon_param_groups
from kalmanopt.runner.optimizers import EXCLUDED_BASELINES, TORCH_BASELINES, logspace, parse_optimizer


# ------------------------------------------------------------------------------------ the names
def test_every_torch_optimizer_is_a_baseline_or_excluded_with_a_reason():
    exported = {name.lower() for name in torch.optim.__all__
                if isinstance(getattr(torch.optim, name), type) and issubclass(getattr(torch.optim, name),
                                                                                torch.optim.Optimizer)} - {"optimizer"}
    assert exported == set(TORCH_BASELINES) | set(EXCLUDED_BASELINES)
    assert {"adafactor", "nadam", "radam", "adamax", "asgd", "rprop", "adadelta", "muon"} <= set(TORCH_BASELINES)
    assert set(EXCLUDED_BASELINES) == {"lbfgs", "sparseadam"}
    assert TORCH_BASELINES["muon"][0] is MuonWithAdamW


def test_the_runners_defaults_are_kept():
    assert TORCH_BASELINES["adamw"][1] == {"lr": 1e-3, "weight_decay": 1e-2}
    assert TORCH_BASELINES["sgd"][1] == {"lr": 0.1, "momentum": 0.9}
    assert TORCH_BASELINES["rmsprop"][1] == {"lr": 1e-3}


@pytest.mark.parametrize("name", sorted(TORCH_BASELINES))
def test_each_baseline_by_a_bare_name_steps_a_model(name):
    spec = parse_optimizer(name)
    assert (spec.family, spec.name) == ("torch", name)
    spec.check()
    torch.manual_seed(0)
    model = MLP(4, 3, hidden=8)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = spec.build(model.parameters(), {}, model=model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_unknown_and_excluded_names_list_the_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown torch baseline 'nadamw'; valid baselines: adadelta, adafactor.*"
                                          r"muon.*sgd"):
        parse_optimizer({"torch": "nadamw"})
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamz'; valid choices: presets .*torch baselines "
                                          r"adadelta"):
        parse_optimizer("adamz")
    with pytest.raises(ConfigError, match=r"'lbfgs' is not available in the runner: .*closure.*valid baselines"):
        parse_optimizer("lbfgs")
    with pytest.raises(ConfigError, match=r"'SparseAdam' is not available.*sparse gradients"):
        parse_optimizer({"torch": "SparseAdam"})
    with pytest.raises(ConfigError, match=r"unknown keyword\(s\) \['momentum'\].*valid keywords: beta2_decay, d, eps"):
        parse_optimizer({"torch": "adafactor", "momentum": 0.9}).check()
    with pytest.raises(ConfigError, match=r"adjust_lr_fn"):
        parse_optimizer({"torch": "muon", "adjust_lr_fn": "keller"}).check()


# ------------------------------------------------------------------------------------ logspace
def test_logspace_values_and_sweeps():
    assert logspace([1e-4, 1e-2, 5]) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    assert logspace([1, 8, 4]) == [1.0, 2.0, 4.0, 8.0]
    spec = parse_optimizer({"torch": "adamw", "weight_decay": 0.1, "lr": {"logspace": [1e-3, 1e-1, 3]}})
    assert spec.grid == {"lr": [1e-3, 1e-2, 1e-1]} and spec.keywords == {"weight_decay": 0.1}
    spec = parse_optimizer({"torch": "sgd", "grid": {"lr": {"logspace": [0.01, 1, 3]}, "momentum": [0.0, 0.9]}})
    assert spec.grid == {"lr": [0.01, 0.1, 1.0], "momentum": [0.0, 0.9]} and len(spec.settings()) == 6


@pytest.mark.parametrize("bad, message", [
    ([1e-3, 1e-2, 1], r"n >= 2, got 1"),
    ([1e-3, 1e-2, 2.5], r"n >= 2, got 2.5"),
    ([-1e-3, 1e-2, 5], r"bound low must be a positive finite number.*got -0.001"),
    ([1e-3, 0, 5], r"bound high must be a positive finite number.*got 0"),
    ([1e-2, 1e-3, 5], r"low < high, got low 0.01 and high 0.001"),
    ([1e-3, 1e-2], r"three values \[low, high, n\]"),
])
def test_bad_logspaces_name_the_problem(bad, message):
    with pytest.raises(ConfigError, match=r"optimizer 'adamw', lr: logspace .*" + message):
        parse_optimizer({"torch": "adamw", "lr": {"logspace": bad}})


def test_a_keyword_swept_twice_is_refused():
    with pytest.raises(ConfigError, match="lr given both as a keyword and in the grid"):
        parse_optimizer({"torch": "adamw", "lr": {"logspace": [1e-3, 1e-2, 3]}, "grid": {"lr": [0.1]}})


# ------------------------------------------------------------------------------------ Muon + AdamW
def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_gpt_parameters_split_as_documented():
    model = GPT(vocab_size=11, block_size=8, d_model=16, n_layer=2, n_head=2)
    muon, adamw = muon_param_groups(model)
    assert muon["use_muon"] and not adamw["use_muon"]
    assert _names(model, muon["params"]) == [f"blocks.{i}.{m}.weight" for i in range(2)
                                             for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    rest = _names(model, adamw["params"])
    assert {"token.weight", "position.weight", "ln.weight", "blocks.0.ln1.weight", "blocks.0.mlp.0.bias"} <= set(rest)
    assert len(rest) + len(muon["params"]) == len(list(model.parameters()))  # the tied head is the token embedding


def test_mlp_and_cnn_keep_their_output_layer_and_filters_on_adamw():
    mlp = MLP(64, 10, hidden=32, depth=2)
    muon, adamw = muon_param_groups(mlp)
    assert _names(mlp, muon["params"]) == ["net.0.weight", "net.2.weight"]
    assert _names(mlp, adamw["params"]) == ["net.0.bias", "net.2.bias", "net.4.weight", "net.4.bias"]
    cnn = DigitsCNN(channels=4)
    assert [g["use_muon"] for g in muon_param_groups(cnn)] == [False]  # 4-D filters and the head: AdamW only
    plain = MuonWithAdamW([torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)])
    assert [len(g["params"]) for g in plain.param_groups] == [1, 1]  # without a model: 2-D is Muon


def _train(model, optimizer, scheduler, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 8), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()


def _gpt_with_optimizer():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, d_model=16, n_layer=1, n_head=2)
    optimizer = MuonWithAdamW(muon_param_groups(model), lr=0.02, adamw_lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
    return model, optimizer, scheduler


def test_both_halves_move_and_the_scheduler_drives_both():
    model, optimizer, scheduler = _gpt_with_optimizer()
    muon, adamw = (list(g["params"]) for g in optimizer.param_groups)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    _train(model, optimizer, scheduler, 3)
    assert all(not torch.equal(before[id(p)], p) for p in muon + adamw)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 / 4, 3e-3 / 4])
    assert all("momentum_buffer" in optimizer.state[p] for p in muon)
    assert all("exp_avg" in optimizer.state[p] for p in adamw)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="cannot take a parameter group"):
        optimizer.add_param_group({"params": [torch.zeros(2, 2)], "use_muon": True})


def test_state_dict_round_trip_resumes_identically():
    model, optimizer, scheduler = _gpt_with_optimizer()
    _train(model, optimizer, scheduler, 3)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    assert sorted(saved[1]) == ["param_groups", "state"]  # the ordinary format
    _train(model, optimizer, scheduler, 3, seed=1)
    straight = [p.detach().clone() for p in model.parameters()]

    resumed, optimizer2, scheduler2 = _gpt_with_optimizer()
    resumed.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    _train(resumed, optimizer2, scheduler2, 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed.parameters()))
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


# ------------------------------------------------------------------------------ others: a second group
def test_others_gives_the_parameters_outside_the_hidden_matrices_their_own_keywords():
    model = GPT(vocab_size=11, block_size=8, d_model=16, n_layer=2, n_head=2)
    spec = parse_optimizer({"preset": "koala-adam-eigen", "lr": 1e-3, "others": {"max_dim": 1}})
    spec.check()
    optimizer = spec.build(model.parameters(), {"lr": 1e-3}, model=model)
    hidden, rest = optimizer.param_groups
    muon, adamw = muon_param_groups(model)
    assert [id(p) for p in hidden["params"]] == [id(p) for p in muon["params"]]
    assert [id(p) for p in rest["params"]] == [id(p) for p in adamw["params"]]
    assert hidden["max_dim"] == 1024 and rest["max_dim"] == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (4, 8), generator=g)
    losses = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    losses.mean().backward()
    optimizer.step(loss=losses)
    token, qkv = model.token.weight, model.blocks[0].attn.qkv.weight
    assert optimizer.state[token]["basis_rows"].ndim == 1  # an embedding: no basis (the identity, kept diagonal)
    assert optimizer.state[qkv]["basis_rows"].ndim == 2  # a hidden matrix: its eigenbasis
    adamw_spec = parse_optimizer({"torch": "adamw", "weight_decay": 0.1, "others": {"weight_decay": 0.0}})
    groups = adamw_spec.build(model.parameters(), adamw_spec.settings()[0], model=model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    plain = parse_optimizer({"torch": "adamw", "others": {"weight_decay": 0.0}}).build(
        [torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)], {})
    assert [len(g["params"]) for g in plain.param_groups] == [1, 1]  # without a model: 2-D is hidden


@pytest.mark.parametrize("entry, message", [
    ({"preset": "koala-adam-eigen", "others": {"max_dims": 1}}, r"unknown keyword\(s\) \['max_dims'\] in others"),
    ({"preset": "koala-adam-eigen", "others": 1}, "others of optimizer 'koala-adam-eigen' must be a table"),
    ({"torch": "muon", "others": {"lr": 1e-3}}, "others does not apply to it"),
    ({"preset": "koala-adam-eigen", "others": {"max_dim": 0}}, "max_dim"),
])
def test_bad_others_are_refused_with_the_reason(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_optimizer(entry).check()


# ------------------------------------------------------------------------------------ heavyball
def test_a_heavyball_optimizer_is_a_baseline_stepping_eagerly(tmp_path):
    pytest.importorskip("heavyball", reason="the baselines extra is not installed: pip install 'kalmanopt[baselines]'")
    spec = parse_optimizer({"heavyball": "SOAP", "lr": 3e-3, "precondition_frequency": 5})
    spec.check()
    assert (spec.family, spec.name, spec.describe(), spec.is_kalman) == ("heavyball", "soap", "heavyball soap", False)
    model = GPT(vocab_size=11, block_size=8, d_model=16, n_layer=1, n_head=2)
    optimizer = spec.build(model.parameters(), spec.settings()[0], model=model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, scheduler, 6)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    import heavyball.utils
    assert heavyball.utils.compile_mode is None  # eager: no minutes of torch.compile autotuning on a CPU


def test_unknown_heavyball_names_and_keywords_list_the_choices():
    pytest.importorskip("heavyball", reason="the baselines extra is not installed: pip install 'kalmanopt[baselines]'")
    with pytest.raises(ConfigError, match=r"unknown heavyball optimizer 'soapy'; valid choices: .*psgdkron.*soap"):
        parse_optimizer({"heavyball": "soapy"})
    with pytest.raises(ConfigError, match=r"unknown keyword\(s\) \['shampoo_betas'\].*shampoo_beta"):
        parse_optimizer({"heavyball": "soap", "shampoo_betas": 0.9}).check()


def test_without_heavyball_the_error_says_how_to_install_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_heavyball(name, *args, **kwargs):
        if name == "heavyball" or name.startswith("heavyball."):
            raise ImportError("No module named 'heavyball'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_heavyball)
    with pytest.raises(ConfigError, match=r"heavyball baselines need heavyball.*pip install 'kalmanopt\[baselines\]'"):
        parse_optimizer({"heavyball": "soap"})
