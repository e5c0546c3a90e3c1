"""Local training (plain SGD or Opacus DP-SGD) and evaluation of one model."""

from __future__ import annotations

import copy
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flower_app import clipped_grads
from flower_app.data import keep_batch
from flower_app.device import model_device
from flower_app.keyed_opacus import KeyedPoissonSampler, use_keyed_noise
from flower_app.model import MODELS
from flower_app.privacy import PrivacyLedger, steps_per_epoch
from flower_app.rng import PrivacyRandomness

EVAL_BATCH = 500
BUILTIN_CLASSES = tuple(MODELS.values())
# The fast path's clipped sum must equal Opacus's (hooks + DPOptimizer clipping) to this
# times max(1, its largest entry) (float32 sums in another order differ by about 1e-7).
FAST_PATH_TOLERANCE = 1e-5


# What a node says when the check fails: fixed text, since anything computed from the batch
# would leave the node un-noised.
GRADIENT_CHECK_FAILED = (
    "grad-sample-mode=fast: the clipped gradient sum differs from Opacus's; not training "
    "(use grad-sample-mode=hooks)"
)


class GradientCheckError(RuntimeError):
    """The fast path's clipped gradients differ from Opacus's: the node must not train."""


def quiet_opacus_logging() -> None:
    """Print each Flower log line once in a process that imported Opacus.

    Importing Opacus runs `logging.basicConfig`, which gives the root logger a handler;
    Flower's logger has its own and propagates to the root, so every line printed twice.
    The ClientApp and the ServerApp call this first.
    """
    logging.getLogger("flwr").propagate = False


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training did."""

    loss: float
    steps: int


def _optimizer(model: nn.Module, lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _batches(loader: Iterable, *, epochs: int, steps: int) -> Iterator:
    """`epochs` passes over `loader`, or its first `steps` batches (repeating it) if `steps`."""
    if steps:
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)
    return itertools.chain.from_iterable(itertools.repeat(loader, epochs))


def _to(device: torch.device, batches: Iterable) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each batch on the model's `device` (a no-op when the shard is already there)."""
    for batch in batches:
        yield tuple(t.to(device) for t in batch)


def train_plain(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    steps: int = 0,
    generator: torch.Generator | None = None,
) -> LocalResult:
    """Non-private SGD (eps=inf): shuffled mini-batches, no clipping, no noise.

    `epochs` passes over the data, or exactly `steps` mini-batches when `steps` > 0. The
    batches go to the model's device (`flower_app.device`: where the node put it).
    """
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=keep_batch
    )
    optimizer = _optimizer(model, lr, momentum)
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, taken = 0.0, 0
    for x, y in _to(model_device(model), _batches(loader, epochs=epochs, steps=steps)):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
        taken += 1
    return LocalResult(loss=total / max(taken, 1), steps=taken)


def train_dp(
    model: nn.Module,
    data: TensorDataset,
    ledger: PrivacyLedger,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    steps: int = 0,
    randomness: PrivacyRandomness | None = None,
) -> LocalResult:
    """DP-SGD with Opacus: Poisson batches, per-sample clipping, Gaussian noise.

    Trains `epochs` epochs, or exactly `steps` Poisson steps when `steps` > 0 (run-config
    `local-steps`); the sample rate is 1/⌈n / batch⌉ either way.

    `randomness` draws the Poisson batches and the Gaussian noise from keyed ChaCha20
    streams (`flower_app.rng`); None draws a fresh secret key. Each
    epoch takes exactly ⌈n / batch⌉ steps at sample rate 1/⌈n / batch⌉, the count the
    noise was calibrated for (Opacus's own Poisson loader takes int(1/q) steps, one fewer
    for some n). The accountant starts from the node's ledger, so Opacus itself tracks the
    cumulative spend; the steps it counts this round are returned for the ledger.

    The batches go to the model's device; the batches' indices and the noise are drawn on
    the CPU by the keyed streams and then moved there (`keyed_opacus`).
    """
    fast, grad_sample_mode = _fast_path(model, grad_sample_mode, data)
    rand = randomness or PrivacyRandomness.fresh()
    per_epoch = steps_per_epoch(len(data), batch_size)
    loader = _poisson_loader(data, per_epoch, steps=per_epoch, randomness=rand)
    dp = _make_private(
        model,
        _optimizer(model, lr, momentum),
        loader,
        ledger,
        max_grad_norm=max_grad_norm,
        # fast: Opacus wraps as for ghost clipping, whose optimizer takes the clipped sum
        # in p.grad and adds the noise; its accountant counts the steps.
        grad_sample_mode="ghost" if fast else grad_sample_mode,
    )
    use_keyed_noise(dp.optimizer, rand.noise)
    _check_sample_rate(dp, ledger)
    if steps:
        # Opacus took the sample rate from the one-epoch loader; the steps come from a
        # sampler of the same rate that stops after `steps` batches.
        batches: Iterable = _poisson_loader(data, per_epoch, steps=steps, randomness=rand)
    else:
        batches = _batches(dp.loader, epochs=epochs, steps=0)
    batches = _to(model_device(model), batches)
    if fast:
        loss = _fast_epochs(dp, model, batches, max_grad_norm)
    else:
        loss = _dp_epochs(dp, batches, empty_batches_by_hand=grad_sample_mode == "ew")
    taken = _steps_taken(dp, ledger, expected=steps or epochs * len(dp.loader))
    dp.model._close()  # remove Opacus hooks and attributes; the caller keeps using `model`
    return LocalResult(loss=loss, steps=taken)


def _fast_path(model: nn.Module, grad_sample_mode: str, data: TensorDataset) -> tuple[bool, str]:
    """Whether `fast` covers the model, and the Opacus mode to fall back on when it does not.

    The fallback is said once per process and model (not every round), naming the layers.
    """
    if grad_sample_mode != "fast":
        return False, grad_sample_mode
    missing = clipped_grads.uncovered(model) or _probe_fast_path(model, data)
    if not missing:
        return True, "fast"
    what = f"{type(model).__name__}: {', '.join(missing)}"
    if what not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(what)
        logging.getLogger(__name__).warning(
            "grad-sample-mode=fast does not cover %s; training with Opacus hooks instead "
            "(said once per process)",
            what,
        )
    return False, "hooks"


_FALLBACKS_SAID: set[str] = set()


def _probe_fast_path(model: nn.Module, data: TensorDataset) -> list[str]:
    """What stops `clipped_grads` on two examples of a model of one's own (the built-ins pass).

    It covers every layer type such a model has, but not every use of one (a linear layer
    on a 3-D input); the random state is restored, so training draws what it would have.
    """
    if type(model) in BUILTIN_CLASSES or len(data) == 0:
        return []
    x, y = (t[:2].to(model_device(model)) for t in data.tensors)
    with torch.random.fork_rng():
        try:
            clipped_grads.clipped_sum(model, x, y, 1.0)
        except ValueError as err:
            return [str(err)]
    return []


def _poisson_loader(
    data: TensorDataset, per_epoch: int, *, steps: int, randomness: PrivacyRandomness
) -> DataLoader:
    """`steps` keyed Poisson batches at sample rate 1/`per_epoch` (1/⌈n / batch⌉)."""
    sampler = KeyedPoissonSampler(
        num_samples=len(data),
        sample_rate=1 / per_epoch,
        steps=steps,
        stream=randomness.sampling,
    )
    return DataLoader(data, batch_sampler=sampler, collate_fn=keep_batch)


def _check_sample_rate(dp: _Private, ledger: PrivacyLedger) -> None:
    """Refuse to train at another sample rate than the noise was calibrated for."""
    if abs(1 / len(dp.loader) - ledger.sample_rate) > 1e-12:
        raise RuntimeError(
            f"sample rate {1 / len(dp.loader)} differs from the calibrated {ledger.sample_rate}: "
            "the node's data changed between rounds"
        )


def _steps_taken(dp: _Private, ledger: PrivacyLedger, *, expected: int) -> int:
    """The steps Opacus's accountant counted this round, which must be the ones planned."""
    taken = sum(n for _, _, n in dp.engine.accountant.history) - ledger.steps
    if taken != expected:
        raise RuntimeError(
            f"the accountant counted {taken} steps, expected {expected}: privacy accounting "
            "would be wrong"
        )
    return taken


@dataclass(frozen=True)
class _Private:
    """What Opacus's `make_private` wrapped: model, optimizer, loss, loader, and its engine."""

    engine: PrivacyEngine
    model: AbstractGradSampleModule
    optimizer: DPOptimizer
    criterion: nn.Module
    loader: DataLoader


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    ledger: PrivacyLedger,
    *,
    max_grad_norm: float,
    grad_sample_mode: str,
) -> _Private:
    """Wrap for DP-SGD, the accountant resuming from the ledger's steps."""
    with warnings.catch_warnings():
        # secure_mode=False makes Opacus warn on every call; its secure mode needs
        # torchcsprng, and the noise and batches come from keyed streams (`use_keyed_noise`).
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=ledger.accountant, secure_mode=False)
        if ledger.steps:
            engine.accountant.history = [
                (ledger.noise_multiplier, ledger.sample_rate, ledger.steps)
            ]
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=max_grad_norm,
            grad_sample_mode=grad_sample_mode,
            # The loader above already samples Poisson batches, with the exact step count.
            poisson_sampling=False,
        )
    if grad_sample_mode == "ghost":
        private_model, dp_optimizer, criterion, dp_loader = made
    else:
        private_model, dp_optimizer, dp_loader = made
        criterion = nn.CrossEntropyLoss()
    return _Private(engine, private_model, dp_optimizer, criterion, dp_loader)


def _dp_epochs(dp: _Private, batches: Iterable, *, empty_batches_by_hand: bool) -> float:
    """One DP step per batch; the mean loss over the non-empty batches."""
    dp.model.train()
    total, counted = 0.0, 0
    with warnings.catch_warnings():
        # Opacus's hooks trip a PyTorch warning about inputs without grad on every batch.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for x, y in batches:
            dp.optimizer.zero_grad(set_to_none=True)
            if len(y) == 0 and empty_batches_by_hand:
                _empty_step(dp.optimizer)
                continue
            loss = dp.criterion(dp.model(x), y)
            loss.backward()
            dp.optimizer.step()
            if len(y):  # Poisson sampling can draw an empty batch: a step, but no loss
                total += loss.item()
                counted += 1
    return total / max(counted, 1)


def _fast_epochs(dp: _Private, model: nn.Module, batches: Iterable, max_grad_norm: float) -> float:
    """`_dp_epochs` with the clipped sum from `clipped_grads`, noised by Opacus's optimizer.

    Opacus's own hooks are removed; on the first non-empty batch the clipped sum is
    compared with Opacus's (`_opacus_clipped_sum`), and a difference beyond
    `FAST_PATH_TOLERANCE` raises `GradientCheckError` before any step is taken.
    """
    dp.model.remove_hooks()
    _take_clipped_sums(dp.optimizer)
    model.train()
    layers = clipped_grads.trainable_layers(model)
    total, counted, checked = 0.0, 0, False
    for x, y in batches:
        dp.optimizer.zero_grad(set_to_none=True)
        step = clipped_grads.clipped_sum(model, x, y, max_grad_norm, layers=layers)
        if not checked and len(y):
            _check_against_opacus(model, x, y, max_grad_norm, step)
            checked = True
        for p, summed in step.sums.items():
            p.grad = summed
        dp.optimizer.step()
        if len(y):
            total += float(step.loss)
            counted += 1
    return total / max(counted, 1)


def _take_clipped_sums(optimizer: DPOptimizer) -> None:
    """Opacus's `accumulate` without its deep copy (about 1 ms a step here).

    Each step's clipped sum is a fresh tensor the fast path made, so it becomes
    `p.summed_grad` as it is; `add_noise` then sets `p.grad` anew.
    """

    def accumulate() -> None:
        for p in optimizer.params:
            if p.summed_grad is None:
                p.summed_grad, p.grad = p.grad, None
            else:
                p.summed_grad.add_(p.grad)

    optimizer.accumulate = accumulate


def _opacus_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> list[torch.Tensor]:
    """Σ clip(per-example gradient) as Opacus computes it: `hooks`, then `DPOptimizer` clipping.

    On a copy of `model`, one per trainable parameter in `model.parameters()` order.
    """
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    wrapped = GradSampleModule(ref, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(y),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in params]
    wrapped._close()
    return sums


def _check_against_opacus(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    step: clipped_grads.ClippedStep,
) -> None:
    reference = _opacus_clipped_sum(model, x, y, max_grad_norm)
    fast = [step.sums[p] for p in model.parameters() if p.requires_grad]
    scale = max(float(r.abs().max()) for r in reference)
    diff = max(float((f - r).abs().max()) for f, r in zip(fast, reference, strict=True))
    if not diff <= FAST_PATH_TOLERANCE * max(scale, 1.0):
        # The numbers come from a real batch: they stay in the node's own log.
        logging.getLogger(__name__).error(
            "fast path off by %.3g (largest entry %.3g) on this batch", diff, scale
        )
        raise GradientCheckError(GRADIENT_CHECK_FAILED)


def _empty_step(optimizer: DPOptimizer) -> None:
    """A noise-only step for an empty Poisson batch under ExpandedWeights.

    ExpandedWeights refuses an empty batch ("Batch size must be positive"), but the step
    still counts and must still add noise: hand the optimizer zero per-sample gradients,
    as hooks mode would.
    """
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


@torch.inference_mode()
def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over `data`, computed on the model's device."""
    model.eval()
    loss_sum, correct = 0.0, 0
    images, labels = data.tensors
    device = model_device(model)
    for start in range(0, len(labels), EVAL_BATCH):
        x = images[start : start + EVAL_BATCH].to(device)
        y = labels[start : start + EVAL_BATCH].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = len(data)
    return loss_sum / n, correct / n
