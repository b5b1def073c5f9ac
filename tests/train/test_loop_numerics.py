"""The training step's numerics: loss normalised by the global number of target tokens, gradient
accumulation equal to one big batch (float64 reference), the non-finite policies, activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from polycom_lm.distributed.ddp import DDPEngine
from polycom_lm.models import build_model
from polycom_lm.train.loop import Trainer, TrainingStopped
from polycom_lm.train.optim import build_optimizer, build_schedule
from polycom_lm.distributed.mesh import ParallelDims, ParallelMesh
from polycom_lm.distributed.parallelize import apply_activation_checkpointing
from polycom_lm.train.validation import validate_config
from polycom_lm.train.trainer_state import TrainerState
from trainer_test_helpers import load, run_config

SEQ_LEN = 16
BATCH = 8


class FixedBatches:
    """Stands in for PackedDataset: the same global batch every step, some targets ignored (-100)."""

    def __init__(self, vocab_size: int):
        generator = torch.Generator().manual_seed(3)
        self.tokens = torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)
        # Ignore the last 1..7 targets of some rows, so micro-batches hold different numbers of targets and
        # an average of micro-batch means differs from the global token mean.
        for row, ignored in enumerate([0, 7, 0, 0, 3, 0, 5, 1]):
            if ignored:
                self.tokens[row, SEQ_LEN + 1 - ignored:] = -100
        self.tokens[:, :-1].clamp_(min=0)  # inputs stay valid token ids

    def global_batch(self, consumed_samples, global_batch_size, dp_rank, dp_world_size):
        per_rank = global_batch_size // dp_world_size
        return {"input_ids": self.tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank].clone()}


class RecordingEngine(DDPEngine):
    """Records gradients just before the optimizer step; can fake a non-finite gradient norm."""

    nan_at_call: int | None = None

    def wrap(self, model, build_optimizer):
        super().wrap(model, build_optimizer)
        self.gradients: dict[str, torch.Tensor] = {}
        self.calls = 0

    def clip_grad_norm(self, max_norm):
        self.calls += 1
        norm = super().clip_grad_norm(max_norm)
        return torch.tensor(float("nan")) if self.calls == self.nan_at_call else norm

    def optimizer_step(self):
        self.gradients = {n: p.grad.detach().clone() for n, p in self.unwrapped_model().named_parameters()}
        super().optimizer_step()


def _trainer(tmp_path, micro_batch_size, activation="swiglu", on_nonfinite="skip", saved=None, cross_entropy="logits",
             **model):
    raw = run_config({"train": "unused", "validation": "unused"}, tmp_path / "run", seq_len=SEQ_LEN,
                     global_batch_size=BATCH, micro_batch_size=micro_batch_size, on_nonfinite=on_nonfinite,
                     cross_entropy=cross_entropy, cross_entropy_chunk_tokens=5)
    raw["model"].update({"activation": activation, **model})
    raw["optimizer"]["grad_clip_norm"] = None
    config = load(raw)
    layout = validate_config(config, 1)
    cpu = torch.device("cpu")
    engine = RecordingEngine(config, cpu, ParallelMesh(ParallelDims(world_size=1), cpu))
    torch.manual_seed(0)
    network = build_model(config.model, device="cpu")
    initial = copy.deepcopy(network)
    engine.wrap(network, lambda module: build_optimizer(module, config.optimizer))
    trainer = Trainer(
        config, engine, layout, FixedBatches(config.model.vocab_size), TrainerState(),
        build_schedule(config.schedule, config.training.max_steps, layout.tokens_per_step), [],
        flops_per_token=1.0, peak_flops_per_device=1.0, world_size=1, barrier=lambda: None,
        save_checkpoint=lambda t: saved.append((t.state.step, copy.deepcopy(t.engine.unwrapped_model()))) if saved is not None else None,
    )
    return trainer, initial


@pytest.mark.parametrize("cross_entropy,tie_embeddings", [("logits", False), ("fused", False), ("fused", True)])
def test_accumulated_gradients_equal_the_global_token_mean_in_float64(tmp_path, cross_entropy, tie_embeddings):
    # fused: the head and the loss in chunks of 5 tokens (micro-batches of 2 x 16 targets, some ignored).
    trainer, initial = _trainer(tmp_path, micro_batch_size=2, cross_entropy=cross_entropy, tie_embeddings=tie_embeddings)
    result = trainer.train_step()

    reference = initial.double()
    tokens = trainer.dataset.tokens
    logits = reference(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none", ignore_index=-100)
    mean = losses.sum() / (tokens[:, 1:] != -100).sum()
    mean.backward()
    assert result.loss == pytest.approx(mean.item(), rel=1e-6)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(trainer.engine.gradients[name].double(), parameter.grad, rtol=2e-4, atol=1e-7)

    # The test can fail: averaging the four micro-batch means gives a loss 10x beyond the tolerance above.
    per_row = losses.view(BATCH, SEQ_LEN).sum(1)
    counts = (tokens[:, 1:] != -100).sum(1)
    mean_of_means = torch.stack([per_row[i:i + 2].sum() / counts[i:i + 2].sum() for i in range(0, BATCH, 2)]).mean()
    assert abs(mean_of_means.item() - mean.item()) > 10 * 1e-6 * mean.item()


def test_micro_batch_size_does_not_change_the_step(tmp_path):
    one, _ = _trainer(tmp_path, micro_batch_size=8)
    four, _ = _trainer(tmp_path, micro_batch_size=2)
    results = [one.train_step(), four.train_step()]
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    for name, gradient in one.engine.gradients.items():
        torch.testing.assert_close(four.engine.gradients[name], gradient, rtol=1e-4, atol=1e-7)


def test_nonfinite_skip_drops_the_update_counts_it_and_continues(tmp_path):
    trainer, _ = _trainer(tmp_path, micro_batch_size=4)
    trainer.engine.nan_at_call = 2
    trainer.train_step()
    after_first = copy.deepcopy(trainer.engine.unwrapped_model().state_dict())
    skipped = trainer.train_step()
    assert not skipped.finite and trainer.state.skipped_steps == 1 and trainer.state.step == 2
    for name, value in trainer.engine.unwrapped_model().state_dict().items():
        assert torch.equal(value, after_first[name]), name  # the bad update was not applied
    assert trainer.state.consumed_samples == 2 * BATCH  # its batch still counts as consumed
    assert trainer.train_step().finite
    assert trainer.state.step == 3


def test_nonfinite_stop_saves_the_last_good_state_and_stops(tmp_path):
    saved = []
    trainer, _ = _trainer(tmp_path, micro_batch_size=4, on_nonfinite="stop", saved=saved)
    trainer.engine.nan_at_call = 2
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient norm at step 2 .*on_nonfinite=skip"):
        trainer.fit()
    (step, model), = saved
    assert step == 2
    good = trainer.engine.unwrapped_model().state_dict()
    assert all(torch.equal(value, good[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("mode", ["activation", "block"])
def test_activation_checkpointing_keeps_names_and_gradients(tmp_path, mode):
    plain, _ = _trainer(tmp_path, micro_batch_size=4, activation="polynorm")
    checkpointed, _ = _trainer(tmp_path, micro_batch_size=4, activation="polynorm")
    names = list(checkpointed.engine.unwrapped_model().state_dict())
    assert apply_activation_checkpointing(checkpointed.engine.unwrapped_model(), mode) == 2
    assert list(checkpointed.engine.unwrapped_model().state_dict()) == names
    results = [plain.train_step(), checkpointed.train_step()]
    assert results[0].loss == results[1].loss
    for name, gradient in plain.engine.gradients.items():
        torch.testing.assert_close(checkpointed.engine.gradients[name], gradient, rtol=1e-5, atol=1e-8)


def test_compiled_blocks_match_eager_steps(tmp_path):
    from polycom_lm.train import build_trainer

    def trainer(compile_blocks):
        raw = run_config({"train": "unused", "validation": "unused"}, tmp_path / "run", seq_len=SEQ_LEN,
                         global_batch_size=BATCH, micro_batch_size=4, compile=compile_blocks)
        raw["model"]["activation"] = "polynorm"
        config = load(raw)
        return build_trainer(config, FixedBatches(config.model.vocab_size), device=torch.device("cpu"))

    eager, compiled = trainer(False), trainer(True)
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in compiled.engine.unwrapped_model().layers)
    for _ in range(2):
        expected, result = eager.train_step(), compiled.train_step()
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-3)


def test_moe_auxiliary_losses_are_logged_beside_the_cross_entropy(tmp_path):
    from polycom_lm.train import build_trainer

    raw = run_config({"train": "unused", "validation": "unused"}, tmp_path / "run", seq_len=SEQ_LEN,
                     global_batch_size=BATCH, micro_batch_size=4)
    raw["model"].update({"family": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_size": 32}})
    config = load(raw)
    trainer = build_trainer(config, FixedBatches(config.model.vocab_size), device=torch.device("cpu"))
    model = trainer.engine.unwrapped_model()
    tokens = trainer.dataset.tokens
    cross_entropy = F.cross_entropy(_replay_logits(trainer, tokens), tokens[:, 1:].flatten(), ignore_index=-100)
    result = trainer.train_step()
    assert set(result.aux_losses) == set(model.last_aux_losses) and all(v > 0 for v in result.aux_losses.values())
    # The logged loss is the cross-entropy alone (the auxiliary terms are logged beside it).
    assert result.loss == pytest.approx(cross_entropy.item(), rel=1e-5)
    row = trainer.training_row([result], 1.0)
    assert {f"aux/{name}" for name in result.aux_losses} <= set(row)
    assert any(key.startswith("moe/") and not key.startswith("moe/moe/") for key in row)


def _replay_logits(trainer, tokens):
    with torch.no_grad():
        return trainer.engine.unwrapped_model()(tokens[:, :-1]).flatten(0, 1)


@pytest.mark.parametrize("family", ["dense_compiled", "moe"])
def test_fused_cross_entropy_steps_match_the_logits_path(tmp_path, family):
    """The trainer's fused path through torch.compile (blocks and the per-chunk loss step) and through the
    MoE model (whose auxiliary losses ride along): two steps equal to the logits path's."""
    from polycom_lm.models.lm_head import chunk_loss_and_logit_grad
    from polycom_lm.train import build_trainer

    def trainer(cross_entropy):
        raw = run_config({"train": "unused", "validation": "unused"}, tmp_path / cross_entropy, seq_len=SEQ_LEN,
                         global_batch_size=BATCH, micro_batch_size=4, compile=family == "dense_compiled",
                         cross_entropy=cross_entropy, cross_entropy_chunk_tokens=24)
        if family == "moe":
            raw["model"].update({"family": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_size": 32}})
        config = load(raw)
        return build_trainer(config, FixedBatches(config.model.vocab_size), device=torch.device("cpu"))

    logits, fused = trainer("logits"), trainer("fused")
    head = fused.engine.unwrapped_model().output
    assert (head._chunk_fn is not chunk_loss_and_logit_grad) == (family == "dense_compiled")
    for _ in range(2):
        expected, result = logits.train_step(), fused.train_step()
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
        assert result.aux_losses == pytest.approx(expected.aux_losses, rel=1e-5)
