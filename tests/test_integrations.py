"""The trainers people use, with the real libraries, on tiny models built from configs (no downloads).

Each route trains on the CPU and the loss falls; resume continues bit-identically where the library
restores everything (transformers mid-epoch, Lightning at an epoch boundary, accelerate's saved state);
a step with no loss observed is refused with the message that names ``observe``, and changes nothing.
A library that is not installed skips its tests with the reason (``pip install -e ".[integrations]"``).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import kalmanopt

V, T = 16, 12  # vocabulary and sequence length of the tiny language model


def _import_or_skip(name: str, extra: str = "integrations"):
    """The module, or a skip with the reason: not installed, or installed but not importable here."""
    try:
        return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[{extra}]')")
    except Exception as exc:  # noqa: BLE001 - timm: a torchvision built for another torch fails to load
        pytest.skip(f"{name} does not import here: {type(exc).__name__}: {exc}")


def _flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


class Sequences(torch.utils.data.Dataset):
    """Counting sequences mod V from random starts: each next token is learnable from the last."""

    def __init__(self, n=64, classes=False):
        g = torch.Generator().manual_seed(0)
        self.x = (torch.randint(0, V, (n, 1), generator=g) + torch.arange(T)) % V
        self.classes = classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.classes:  # the class is the parity of the first token
            return {"input_ids": self.x[i], "attention_mask": torch.ones(T, dtype=torch.long),
                    "labels": self.x[i, 0] % 2}
        return {"input_ids": self.x[i], "labels": self.x[i]}


# ---------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf():
    return _import_or_skip("transformers")


def _gpt2(hf, dropout=0.1):
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                            bos_token_id=0, eos_token_id=0, resid_pdrop=dropout,
                                            embd_pdrop=dropout, attn_pdrop=dropout))


def _bert(hf):
    torch.manual_seed(0)
    return hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2))


def _args(hf, tmp_path, steps, **kw):
    kw = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "save_strategy": "no", **kw}
    return hf.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, report_to="none", use_cpu=True, seed=0,
                                disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant", **kw)


def _lm_loss(model, data):
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.x, labels=data.x).loss.item()


def _class_loss(model, data):
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.x, labels=data.x[:, 0] % 2).loss.item()


def test_transformers_per_sample_losses_are_the_models_own(hf):
    from kalmanopt.integrations.hf_losses import per_sample_losses, task_of

    data = Sequences()
    lm = _gpt2(hf).eval()
    labels = data.x.clone()
    labels[:, :3] = -100
    out = lm(input_ids=data.x, labels=labels)
    losses = per_sample_losses(task_of(lm), out.logits, labels)
    assert task_of(lm) == "causal_lm" and losses.numel() == data.x.shape[0] * (T - 3)  # targets 1 .. T-1, less 1 and 2
    torch.testing.assert_close(losses.mean(), out.loss)
    bert = _bert(hf).eval()
    y = data.x[:, 0] % 2
    out = bert(input_ids=data.x, labels=y)
    losses = per_sample_losses(task_of(bert), out.logits, y, config=bert.config)
    assert task_of(bert) == "sequence_classification" and losses.shape == (len(data),)
    torch.testing.assert_close(losses.mean(), out.loss)


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_kalman_trainer_trains_with_gradient_accumulation(hf, tmp_path, task):
    from kalmanopt.integrations.transformers import KalmanTrainer

    lm = task == "causal_lm"
    data = Sequences(classes=not lm)
    model = _gpt2(hf) if lm else _bert(hf)
    measure = _lm_loss if lm else _class_loss
    before = measure(model, data)
    trainer = KalmanTrainer(model=model, args=_args(hf, tmp_path, 12 if lm else 16), train_dataset=data,
                            optimizer_cls_and_kwargs=(kalmanopt.optim.KoalaPP, {"lr": 1.0} if lm else {"lr": 0.5}))
    trainer.train()
    assert measure(model, data) < (0.5 if lm else 0.9) * before
    opt = kalmanopt.api.find_kalman_optimizer(trainer.optimizer)
    assert type(opt) is kalmanopt.optim.KoalaPP and len(opt._observed) == 0
    assert int(opt.state["group0"]["steps"]) == trainer.state.global_step


def test_kalman_trainer_resumes_bit_identically_mid_epoch(hf, tmp_path):
    from kalmanopt.integrations.transformers import KalmanTrainer

    data = Sequences()

    def trainer(model, out):
        args = _args(hf, out, 6, save_strategy="steps", save_steps=3)
        return KalmanTrainer(model=model, args=args, train_dataset=data,
                             optimizer_cls_and_kwargs=(kalmanopt.optim.KoalaPP, {"lr": 1.0}))

    straight = _gpt2(hf)
    first = trainer(straight, tmp_path / "a")
    first.train()  # 6 steps of 4 per epoch: the checkpoint at step 3 is mid-epoch
    resumed = _gpt2(hf)
    second = trainer(resumed, tmp_path / "b")
    second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.equal(_flat(resumed), _flat(straight))
    a, b = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert torch.equal(a["group0"]["R"], b["group0"]["R"]) and int(b["group0"]["steps"]) == 6


def test_kalman_callback_makes_a_plain_trainer_work_from_the_models_loss(hf, tmp_path):
    from kalmanopt.integrations.transformers import KalmanCallback

    data = Sequences()
    model = _gpt2(hf)
    before = _lm_loss(model, data)
    opt = kalmanopt.create("koala++", model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, 12), train_dataset=data,
                         optimizers=(opt, sched), callbacks=[KalmanCallback()])
    with pytest.warns(RuntimeWarning, match="R follows mean"):
        trainer.train()
    assert _lm_loss(model, data) < 0.5 * before
    assert int(opt.state["group0"]["steps"]) == 12


def _peek(hf, opt, seen):
    """A callback after the integration's: what the step is about to use."""
    class Peek(hf.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(opt._observed.take())
            opt.observe(seen[-1])

    return Peek()


def test_kalman_trainer_observes_the_accumulated_batch_and_trains_on_its_mean(hf, tmp_path):
    from kalmanopt.integrations.transformers import KalmanTrainer

    data = Sequences(n=16)
    model = _gpt2(hf, dropout=0.0)
    expected = _lm_loss(_gpt2(hf, dropout=0.0), data)  # the mean over both micro-batches' tokens
    opt = kalmanopt.create("koala++", model.parameters())
    seen = []
    trainer = KalmanTrainer(model=model, args=_args(hf, tmp_path, 1), train_dataset=data,
                            optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                            callbacks=[_peek(hf, opt, seen)])
    trainer.train()
    assert len(seen) == 1 and seen[0].shape == (16 * (T - 1),)  # every predicted token of both micro-batches
    torch.testing.assert_close(seen[0].mean().item(), expected, rtol=1e-5, atol=1e-6)
    # the gradient is of the same mean: Trainer's logged loss (the sum of what compute_loss returned)
    torch.testing.assert_close(trainer.state.log_history[0]["loss"], expected, rtol=1e-5, atol=1e-6)


def test_kalman_callback_observes_the_loss_the_trainer_trains_on(hf, tmp_path):
    """Trainer normalises each micro-batch's loss by the accumulated batch's count: they sum to its loss."""
    from kalmanopt.integrations.transformers import KalmanCallback

    data = Sequences(n=16)
    model = _gpt2(hf, dropout=0.0)
    opt = kalmanopt.create("koala++", model.parameters(), r=1.0)  # a fixed R: no warning about the scalar
    seen = []
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, 1), train_dataset=data,
                         optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                         callbacks=[KalmanCallback(), _peek(hf, opt, seen)])
    trainer.train()
    assert len(seen) == 1 and seen[0].dim() == 0
    torch.testing.assert_close(seen[0].item(), trainer.state.log_history[0]["loss"], rtol=1e-5, atol=1e-6)
    assert seen[0].item() > 0.75 * _lm_loss(_gpt2(hf, dropout=0.0), data)  # (the mean of the two would be half)


def test_a_plain_trainer_without_the_callback_is_refused_and_nothing_changes(hf, tmp_path):
    data = Sequences()
    model = _gpt2(hf)
    before = _flat(model)
    opt = kalmanopt.create("koala++", model.parameters())
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, 2), train_dataset=data,
                         optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    with pytest.raises(TypeError, match=r"step needs the loss.*opt\.observe.*kalmanopt\.integrations\.transformers"):
        trainer.train()
    assert torch.equal(_flat(model), before) and not opt.state


def test_kalman_trainer_refuses_a_torch_optimizer_and_an_unknown_task(hf, tmp_path):
    from kalmanopt.integrations.transformers import KalmanTrainer

    trainer = KalmanTrainer(model=_gpt2(hf), args=_args(hf, tmp_path, 1), train_dataset=Sequences())
    with pytest.raises(TypeError, match="found no kalmanopt optimizer in AdamW.*optimizer_cls_and_kwargs"):
        trainer.train()
    base = _gpt2(hf).transformer  # GPT2Model: no head, no loss
    with pytest.raises(ValueError, match="pass per_sample_loss=fn"):
        KalmanTrainer(model=base, args=_args(hf, tmp_path, 1), train_dataset=Sequences())


# ---------------------------------------------------------------------- Lightning


@pytest.fixture(scope="module")
def pl():
    return _import_or_skip("lightning.pytorch")


def _blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    X = torch.randn(n, 5, generator=g) * 0.5 + F.one_hot(y, 5).float() * 2
    return torch.utils.data.TensorDataset(X, y)


def _module(pl, per_sample=True, preset="koala++", **hyperparameters):
    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            self.log("train_loss", losses.mean())
            return {"loss": losses.mean(), "losses": losses} if per_sample else losses.mean()

        def configure_optimizers(self):
            return kalmanopt.optim.preset_class(preset)(self.parameters(), **hyperparameters)

    return Classifier()


def _mean_loss(module):
    X, y = _blobs().tensors
    with torch.no_grad():
        return F.cross_entropy(module.net(X), y).item()


def _pl_trainer(pl, callbacks, **kw):
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "max_epochs": 4, **kw}
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "scalar"])
def test_lightning_trains_with_accumulation_bf16_and_clipping(pl, per_sample):
    from kalmanopt.integrations.lightning import KalmanCallback

    module = _module(pl, per_sample)
    before = _mean_loss(module)
    trainer = _pl_trainer(pl, [KalmanCallback()], accumulate_grad_batches=2, precision="bf16-mixed",
                          gradient_clip_val=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(_blobs(), batch_size=8))
    assert _mean_loss(module) < 0.5 * before
    opt = trainer.optimizers[0]
    assert int(opt.state["group0"]["steps"]) == trainer.global_step == 16 and len(opt._observed) == 0


def test_lightning_per_sample_accumulation_is_the_concatenated_batch(pl):
    """Two micro-batches of 8 through Lightning are one step of the 16 losses, the statistic included."""
    from kalmanopt.integrations.lightning import KalmanCallback

    module = _module(pl, True, r=None, loss_statistic="variance")
    trainer = _pl_trainer(pl, [KalmanCallback()], accumulate_grad_batches=2, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(_blobs(n=16), batch_size=8))
    plain = _module(pl, True)
    opt = kalmanopt.create("koala++", plain.parameters(), loss_statistic="variance")
    X, y = _blobs(n=16).tensors
    chunks = [F.cross_entropy(plain.net(x), t, reduction="none") for x, t in zip(X.split(8), y.split(8))]
    for c in chunks:
        (c.mean() / 2).backward()
    opt.step(loss=torch.cat(chunks))
    torch.testing.assert_close(trainer.optimizers[0].state["group0"]["R"], opt.state["group0"]["R"])
    torch.testing.assert_close(_flat(module), _flat(plain))


def test_lightning_resumes_bit_identically_from_an_epoch_checkpoint(pl, tmp_path):
    from kalmanopt.integrations.lightning import KalmanCallback

    def fit(module, epochs, ckpt=None, save=None):
        checkpoint = [pl.callbacks.ModelCheckpoint(dirpath=str(save), save_top_k=-1, every_n_epochs=1)] if save else []
        trainer = _pl_trainer(pl, [KalmanCallback(), *checkpoint], max_epochs=epochs, accumulate_grad_batches=2,
                              enable_checkpointing=bool(save))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(_blobs(), batch_size=8), ckpt_path=ckpt)

    straight = _module(pl)
    fit(straight, 2, save=tmp_path)
    resumed = _module(pl)
    fit(resumed, 2, ckpt=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert torch.equal(_flat(resumed), _flat(straight))


def test_lightning_without_the_callback_is_refused_and_nothing_changes(pl):
    module = _module(pl)
    before = _flat(module)
    trainer = _pl_trainer(pl, [])
    # an optimizer_step that calls optimizer.step() bare: Lightning passes a closure that returns None
    module.optimizer_step = lambda epoch, batch_idx, optimizer, optimizer_closure: (optimizer_closure(),
                                                                                   optimizer.step())
    refused = r"closure returned None; .*step needs the loss.*kalmanopt\.integrations\.lightning"
    with pytest.raises(TypeError, match=refused):
        trainer.fit(module, torch.utils.data.DataLoader(_blobs(), batch_size=8))
    assert torch.equal(_flat(module), before)


def test_lightning_callback_refuses_a_torch_optimizer(pl):
    from kalmanopt.integrations.lightning import KalmanCallback

    module = _module(pl)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="found no kalmanopt optimizer in SGD"):
        _pl_trainer(pl, [KalmanCallback()]).fit(module, torch.utils.data.DataLoader(_blobs(), batch_size=8))


# ---------------------------------------------------------------------- accelerate


@pytest.fixture(scope="module")
def accelerate():
    return _import_or_skip("accelerate")


def _accelerate_run(accelerate, steps, save=None, load=None):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = kalmanopt.optim.KoalaPP(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(_blobs(), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if load is not None:
        accelerator.load_state(str(load))
    done = 0
    while done < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                losses = F.cross_entropy(model(x), y, reduction="none")
                accelerator.backward(losses.mean())
                kalmanopt.observe(opt, losses)
                opt.step()
                opt.zero_grad()
            done += accelerator.sync_gradients
            if done == steps:
                break
    if save is not None:
        accelerator.save_state(str(save))
    return accelerator.unwrap_model(model), opt


def test_accelerate_trains_with_gradient_accumulation_and_resumes(accelerate, tmp_path):
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X, y = _blobs().tensors
    with torch.no_grad():
        before = F.cross_entropy(initial(X), y).item()
    model, opt = _accelerate_run(accelerate, 8)
    with torch.no_grad():
        assert F.cross_entropy(model(X), y).item() < 0.5 * before
    inner = kalmanopt.api.find_kalman_optimizer(opt)
    assert type(opt).__name__ == "AcceleratedOptimizer" and int(inner.state["group0"]["steps"]) == 8
    # resume: 4 steps, save, a fresh run loads the state and takes 4 more: the 8 steps' parameters
    _accelerate_run(accelerate, 4, save=tmp_path / "state")
    resumed, _ = _accelerate_run(accelerate, 4, load=tmp_path / "state")
    assert torch.equal(_flat(resumed), _flat(model))


def test_accelerated_optimizer_without_observe_is_refused(accelerate):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(5, 3)
    opt = accelerator.prepare(kalmanopt.create("koala++", model.parameters()))
    before = _flat(model)
    X, y = _blobs().tensors
    accelerator.backward(F.cross_entropy(model(X), y))
    with pytest.raises(TypeError, match=r"step needs the loss.*kalmanopt\.observe\(optimizer, losses\)"):
        opt.step()
    assert torch.equal(_flat(model), before)


# ---------------------------------------------------------------------- timm


def test_timm_native_scaler_takes_the_observed_loss():
    """timm imports only beside a torchvision built for the installed torch: not beside the CPU torch wheel."""
    timm_cuda = _import_or_skip("timm.utils.cuda", extra="timm")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X, y = _blobs().tensors
    with torch.no_grad():
        before = F.cross_entropy(model(X), y).item()
    opt = kalmanopt.create("koala++", model.parameters(), lr=1.0)
    scaler = timm_cuda.NativeScaler(device="cpu")
    for _ in range(10):
        losses = F.cross_entropy(model(X), y, reduction="none")
        opt.zero_grad()
        kalmanopt.observe(opt, losses)
        scaler(losses.mean(), opt, clip_grad=1.0, parameters=model.parameters())
    with torch.no_grad():
        assert F.cross_entropy(model(X), y).item() < 0.5 * before


# ---------------------------------------------------------------------- docs/integrations.md


def _page_examples():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [pytest.param(block, id=f"{i}-{block.splitlines()[0].split(':')[1].strip()}")
            for i, block in enumerate(blocks)]


@pytest.mark.parametrize("code", _page_examples())
def test_each_example_of_the_integrations_page_runs(code, tmp_path, monkeypatch):
    """Each block names what it requires on its first line (``# requires: lightning``); it runs as written."""
    required = code.splitlines()[0].split(":", 1)[1].strip()
    _import_or_skip(required, extra="timm" if required == "timm" else "integrations")
    if required == "accelerate":
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__docs__"})
