"""Scaling ladders: the `ladder` section of a study file. It adds a `size` axis (and a `budget` axis when
there are several budgets) in front of the grid, and per-size rules for what must change with size::

    ladder:
      sizes:                               # named presets: dotted config keys, the model's shape at least
        s: {model.d_model: 32, model.n_layers: 2, model.n_heads: 2, model.ffn_hidden_size: 88}
        m: {model.d_model: 64, model.n_layers: 3, model.n_heads: 4, model.ffn_hidden_size: 176}
      # size_rule: {d_model: [32, 64], n_layers: [2, 3], head_dim: 16, ffn_ratio: 2.6667, ffn_multiple: 8}
      size_overrides: {s: {optimizer.lr: 1.0e-2}}   # a size's own value of a key replaces the rule there
      parameters: non_embedding            # what N counts: non_embedding (Kaplan, OLMo) or total
      baseline: swiglu                     # whose N sizes the rules; compare's reference for multipliers
      budget: {tokens_per_parameter: 20, multiples: [1, 2, 5, 10]}   # D = m·20·N (OLMo); or {tokens: [...]}
      lr: {rule: power, exponent: -0.3333, reference_parameters: 786432}
      batch: {rule: power, exponent: 0.6667, reference_parameters: 786432, multiple_of: 8}   # or {rule: fixed}
      warmup: {tokens_per_parameter: 1}    # N tokens (OLMo); or {fraction: 0.05} of the run; or {steps: 30}
      schedule: {name: cosine}             # cosine / linear: to lr_min_ratio at the run's own end; wsd: decay_fraction
      fit: {loss: validation, bootstrap: 200, shared_E: true, seed: 0}

Rules (each reads the run's config at that size, after the study's overrides, grid values and per_value):
- lr: `power`: optimizer.lr · (N / reference_parameters)^exponent (OLMo: −1/3; optimizer.lr, per activation
  through per_value if wanted, is the rate at the reference size); `width`: optimizer.lr · reference_d_model
  / d_model (μP-style width scaling of Adam's rate, one rate for every parameter); `sweep`: select_lr sweeps
  every size (and budget), its runs `budget_fraction` of the budget long; `fixed`: optimizer.lr everywhere.
- batch: `power`: training.global_batch_size · (N / reference_parameters)^exponent, rounded to
  `multiple_of` (OLMo: 2/3); `fixed`: the config's batch.
- training.max_steps = D / tokens per step; the schedule's warmup and decay are in steps of that run, so a
  cosine ends at each run's own end (a mid-run checkpoint is not a shorter run).
Parameter matching of the non-gated activations (3/2 of ffn_hidden_size) holds at every size; a size may
not set model.ffn_width, and a run whose N differs from the baseline's at its size by more than 0.1% is
refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from polycom_lm.config import Config
from polycom_lm.errors import ConfigError
from polycom_lm.study.keys import check_key, mapping, only

LADDER_KEYS = ("sizes", "size_rule", "size_overrides", "parameters", "baseline", "budget", "lr", "batch", "warmup",
               "schedule", "fit")
LR_RULES = {"power": ("exponent", "reference_parameters"), "width": ("reference_d_model",),
            "sweep": ("budget_fraction",), "fixed": ()}
BATCH_RULES = {"power": ("exponent", "reference_parameters", "multiple_of", "min", "max"), "fixed": ()}
SIZE_RULE_KEYS = ("d_model", "n_layers", "head_dim", "ffn_ratio", "ffn_multiple")
FIT_KEYS = ("loss", "bootstrap", "shared_E", "seed")
SIZE, BUDGET = "size", "budget"
# Keys the rules set: a study may set them only per size (they would be overwritten otherwise).
RULE_KEYS = ("training.max_steps", "schedule.units", "schedule.warmup_steps", "schedule.warmup_tokens",
             "schedule.decay_steps", "schedule.decay_tokens", "schedule.name")


@dataclass(frozen=True)
class Budget:
    label: str  # "1x" or "2M"
    multiple: Optional[float] = None  # of tokens_per_parameter · N
    tokens: Optional[float] = None  # a fixed budget

    def tokens_for(self, parameters: int, tokens_per_parameter: float) -> float:
        return self.tokens if self.tokens is not None else self.multiple * tokens_per_parameter * parameters


@dataclass(frozen=True)
class Ladder:
    sizes: dict[str, dict[str, Any]]  # name → dotted settings, in order
    budgets: tuple[Budget, ...]
    tokens_per_parameter: float
    parameters: str  # "non_embedding" or "total"
    baseline: str
    lr: dict[str, Any]  # {"rule": ..., parameters}
    batch: dict[str, Any]
    warmup: dict[str, float]  # one of tokens_per_parameter / fraction / steps
    schedule: dict[str, Any]  # {"name": ..., "decay_fraction": ...}
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """The ladder's axes in run names: size, and budget when there are several."""
        return [SIZE] + ([BUDGET] if len(self.budgets) > 1 else [])

    def budget(self, label: str) -> Budget:
        return next(budget for budget in self.budgets if budget.label == label)

    def lr_description(self) -> str:
        rule = self.lr
        if rule["rule"] == "power":
            return (f"lr = optimizer.lr · (N / {rule['reference_parameters']:,.0f})^({rule['exponent']:g}) (OLMo's "
                    f"rule lr ∝ N^(−1/3) when the exponent is −1/3; N = {self.parameters.replace('_', '-')} parameters)")
        if rule["rule"] == "width":
            return f"lr = optimizer.lr · {rule['reference_d_model']} / d_model (μP-style width scaling, one rate for all)"
        if rule["rule"] == "sweep":
            return f"lr swept per size (select_lr), sweep runs {rule['budget_fraction']:g} of the budget"
        return "lr = optimizer.lr at every size"

    def to_json(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "budgets": [dataclasses.asdict(b) for b in self.budgets],
                "tokens_per_parameter": self.tokens_per_parameter, "parameters": self.parameters,
                "baseline": self.baseline, "lr": self.lr, "lr_description": self.lr_description(),
                "batch": self.batch, "warmup": self.warmup, "schedule": self.schedule, "fit": self.fit,
                "axes": self.axes}


def _number(value: Any, where: str, study: Path, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"{study}: {where} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _rule(raw: Any, rules: dict[str, tuple[str, ...]], where: str, study: Path, required: tuple[str, ...] = ()) -> dict:
    section = mapping(raw, where, study)
    name = section.get("rule")
    if name not in rules:
        raise ConfigError(f"{study}: {where}.rule must be one of {', '.join(rules)}, got {name!r}")
    only(section, ("rule", *rules[name]), f"{where} ({name})", study)
    for key in required:
        if key not in section:
            raise ConfigError(f"{study}: {where}: rule {name} needs {key}")
    return {"rule": name, **{key: _number(value, f"{where}.{key}", study, key != "exponent") for key, value in section.items()
                             if key != "rule"}}


def _sizes(raw: dict, study: Path) -> dict[str, dict[str, Any]]:
    if ("sizes" in raw) == ("size_rule" in raw):
        raise ConfigError(f"{study}: ladder needs exactly one of sizes (named presets) and size_rule (widths and depths)")
    if "sizes" in raw:
        sizes = {}
        for name, settings in mapping(raw["sizes"], "ladder.sizes", study).items():
            settings = {check_key(key, f"ladder.sizes.{name} key", study): value
                        for key, value in mapping(settings, f"ladder.sizes.{name}", study).items()}
            if not any(key.startswith("model.") for key in settings):
                raise ConfigError(f"{study}: ladder.sizes.{name} sets no model key; a size sets the model's shape "
                                  f"(model.d_model, model.n_layers, model.n_heads, model.ffn_hidden_size)")
            sizes[str(name)] = settings
    else:
        sizes = _size_rule(mapping(raw["size_rule"], "ladder.size_rule", study), study)
    for name, settings in mapping(raw.get("size_overrides"), "ladder.size_overrides", study).items():
        if str(name) not in sizes:
            raise ConfigError(f"{study}: ladder.size_overrides names size {name!r}; sizes: {', '.join(sizes)}")
        sizes[str(name)].update({check_key(key, f"ladder.size_overrides.{name} key", study): value
                                 for key, value in mapping(settings, f"ladder.size_overrides.{name}", study).items()})
    if len(sizes) < 2:
        raise ConfigError(f"{study}: a ladder needs at least 2 sizes (3 or more to fit a law), got {len(sizes)}")
    for name, settings in sizes.items():
        if "model.ffn_width" in settings:
            raise ConfigError(f"{study}: ladder size {name} sets model.ffn_width, one width for every activation; set "
                              f"model.ffn_hidden_size (SwiGLU's width) so that non-gated activations take 3/2 of it")
        if "model.activation" in settings or "training.seed" in settings:
            raise ConfigError(f"{study}: ladder size {name} sets model.activation or training.seed; those belong in the grid")
    return sizes


def _size_rule(rule: dict, study: Path) -> dict[str, dict[str, Any]]:
    only(rule, SIZE_RULE_KEYS, "ladder.size_rule", study)
    widths, depths = rule.get("d_model"), rule.get("n_layers")
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(f"{study}: ladder.size_rule.d_model must be a list of positive integers, got {widths!r}")
    if isinstance(depths, int):
        depths = [depths] * len(widths)
    if not isinstance(depths, list) or len(depths) != len(widths) or not all(isinstance(d, int) and d > 0 for d in depths):
        raise ConfigError(f"{study}: ladder.size_rule.n_layers must be a positive integer or a list as long as d_model")
    head_dim = int(_number(rule.get("head_dim", 32), "ladder.size_rule.head_dim", study))
    ratio = _number(rule.get("ffn_ratio", 8 / 3), "ladder.size_rule.ffn_ratio", study)
    multiple = int(_number(rule.get("ffn_multiple", 16), "ladder.size_rule.ffn_multiple", study))
    if multiple % 2:
        raise ConfigError(f"{study}: ladder.size_rule.ffn_multiple must be even (non-gated widths are 3/2 of it), got {multiple}")
    sizes = {}
    for width, depth in zip(widths, depths):
        if width % head_dim:
            raise ConfigError(f"{study}: ladder.size_rule: d_model {width} is not a multiple of head_dim {head_dim}")
        ffn = max(multiple, int(round(ratio * width / multiple)) * multiple)
        sizes[f"d{width}L{depth}"] = {"model.d_model": width, "model.n_layers": depth,
                                      "model.n_heads": width // head_dim, "model.ffn_hidden_size": ffn}
    return sizes


def _tokens_label(tokens: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"


def _budgets(raw: Any, study: Path) -> tuple[tuple[Budget, ...], float]:
    section = mapping(raw, "ladder.budget", study)
    only(section, ("tokens_per_parameter", "multiples", "tokens"), "ladder.budget", study)
    if "tokens" in section and "multiples" in section:
        raise ConfigError(f"{study}: ladder.budget takes multiples (of tokens_per_parameter · N) or tokens, not both")
    per_parameter = _number(section.get("tokens_per_parameter", 20), "ladder.budget.tokens_per_parameter", study)
    key = "tokens" if "tokens" in section else "multiples"
    values = section.get(key, [1])
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{study}: ladder.budget.{key} must be a non-empty list, got {values!r}")
    values = [_number(value, f"ladder.budget.{key}", study) for value in values]
    if len(set(values)) != len(values):
        raise ConfigError(f"{study}: ladder.budget.{key} lists a value twice: {values}")
    if key == "tokens":
        return tuple(Budget(_tokens_label(v), tokens=v) for v in values), per_parameter
    return tuple(Budget(f"{v:g}x", multiple=v) for v in values), per_parameter


def _warmup(raw: Any, study: Path) -> dict[str, float]:
    section = mapping(raw, "ladder.warmup", study) or {"tokens_per_parameter": 1}
    only(section, ("tokens_per_parameter", "fraction", "steps"), "ladder.warmup", study)
    if len(section) != 1:
        raise ConfigError(f"{study}: ladder.warmup takes one of tokens_per_parameter, fraction, steps; got {sorted(section)}")
    (key, value), = section.items()
    value = _number(value, f"ladder.warmup.{key}", study, positive=False)
    if value < 0 or (key == "fraction" and value >= 1):
        raise ConfigError(f"{study}: ladder.warmup.{key} must be >= 0{' and < 1' if key == 'fraction' else ''}, got {value}")
    return {key: value}


def _schedule(raw: Any, study: Path) -> dict[str, Any]:
    section = mapping(raw, "ladder.schedule", study) or {"name": "cosine"}
    only(section, ("name", "decay_fraction"), "ladder.schedule", study)
    name = section.get("name", "cosine")
    if name not in ("cosine", "linear", "wsd"):
        raise ConfigError(f"{study}: ladder.schedule.name must be cosine, linear or wsd (a decay that ends with each run), "
                          f"got {name!r}")
    if name == "wsd":
        fraction = _number(section.get("decay_fraction", 0.2), "ladder.schedule.decay_fraction", study)
        if fraction >= 1:
            raise ConfigError(f"{study}: ladder.schedule.decay_fraction must be below 1, got {fraction}")
        return {"name": name, "decay_fraction": fraction}
    if "decay_fraction" in section:
        raise ConfigError(f"{study}: ladder.schedule.decay_fraction is for wsd; {name} decays over the whole run")
    return {"name": name}


def _fit(raw: Any, study: Path) -> dict[str, Any]:
    section = mapping(raw, "ladder.fit", study)
    only(section, FIT_KEYS, "ladder.fit", study)
    loss = str(section.get("loss", "validation"))
    if loss != "train" and loss != "validation" and not loss.startswith("validation:"):
        raise ConfigError(f"{study}: ladder.fit.loss must be validation, validation:<set name> or train, got {loss!r}")
    draws = section.get("bootstrap", 200)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
        raise ConfigError(f"{study}: ladder.fit.bootstrap must be a number of draws (>= 0), got {draws!r}")
    shared = section.get("shared_E", True)
    if not isinstance(shared, bool):
        raise ConfigError(f"{study}: ladder.fit.shared_E must be true or false, got {shared!r}")
    return {"loss": loss, "bootstrap": draws, "shared_E": shared, "seed": int(section.get("seed", 0))}


def parse_ladder(raw: Any, study: Path, grid: dict[str, list[Any]], overrides: dict[str, Any], select_lr: bool) -> Ladder:
    """The `ladder` section of study file `study` (see the module docstring); one-line ConfigErrors."""
    raw = mapping(raw, "ladder", study)
    only(raw, LADDER_KEYS, "ladder", study)
    sizes = _sizes(raw, study)
    budgets, per_parameter = _budgets(raw.get("budget"), study)
    parameters = raw.get("parameters", "non_embedding")
    if parameters not in ("non_embedding", "total"):
        raise ConfigError(f"{study}: ladder.parameters must be non_embedding or total, got {parameters!r}")
    if "lr" not in raw:
        raise ConfigError(f"{study}: ladder.lr is missing; choose a rule: power (OLMo: lr ∝ N^(−1/3)), width (μP-style), "
                          f"sweep (select_lr per size) or fixed")
    required = {"power": ("exponent", "reference_parameters"), "width": ("reference_d_model",)}
    lr = _rule(raw["lr"], LR_RULES, "ladder.lr", study, required.get(mapping(raw["lr"], "ladder.lr", study).get("rule"), ()))
    if lr["rule"] == "sweep":
        lr.setdefault("budget_fraction", 1.0)
        if not select_lr:
            raise ConfigError(f"{study}: ladder.lr.rule is sweep but select_lr is not true; set select_lr: true")
    elif select_lr:
        raise ConfigError(f"{study}: select_lr sweeps the learning rate but ladder.lr.rule is {lr['rule']}; use lr: {{rule: sweep}}")
    batch_raw = raw.get("batch", {"rule": "fixed"})
    batch_rule = mapping(batch_raw, "ladder.batch", study).get("rule")
    batch = _rule(batch_raw, BATCH_RULES, "ladder.batch", study,
                  ("exponent", "reference_parameters") if batch_rule == "power" else ())
    if batch["rule"] == "power":
        batch.setdefault("multiple_of", 1.0)
    for key in [*grid, *overrides]:
        if key in RULE_KEYS or key.startswith("model.") and any(key in s for s in sizes.values()):
            raise ConfigError(f"{study}: {key} is set by the ladder (its sizes, budget or schedule rule) and also in the "
                              f"study's grid or overrides; drop it there (or set it per size in ladder.size_overrides)")
    baseline = str(raw.get("baseline", "swiglu"))
    return Ladder(sizes, budgets, per_parameter, parameters, baseline, lr, batch, _warmup(raw.get("warmup"), study),
                  _schedule(raw.get("schedule"), study), _fit(raw.get("fit"), study))


_COUNTS: dict[str, tuple[dict[str, int], int]] = {}


def _counts(model_config) -> tuple[dict[str, int], int]:
    """(parameter counts, parameters in weight matrices) of a model config, built once on `meta` per
    distinct config (a ladder plans every size × activation × seed)."""
    key = repr(model_config)
    if key not in _COUNTS:
        from polycom_lm.models import build_model
        from polycom_lm.models.flops import count_parameters

        model = build_model(model_config, device="meta")
        _COUNTS[key] = (count_parameters(model), sum(p.numel() for p in model.parameters() if p.dim() >= 2))
    return _COUNTS[key]


def size_parameters(config: Config, baseline: str) -> dict[str, int]:
    """Parameter counts of `config`'s model with the baseline activation (the size's N)."""
    return dict(_counts(dataclasses.replace(config.model, activation=baseline))[0])


def matrix_parameters(model_config) -> int:
    """Parameters in weight matrices (≥ 2-D): what parameter matching equalises (an activation's own few
    scalar coefficients, PolyNorm's w and b, are left out)."""
    return _counts(model_config)[1]


def _micro_batch(global_batch: int, world_size: int, micro: int) -> int:
    per_rank = max(1, global_batch // world_size)
    return max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)


def rule_settings(ladder: Ladder, config: Config, size: str, budget: Budget, world_size: int,
                  sweep: bool = False) -> dict[str, Any]:
    """The dotted settings the rules give one run (`config`: the run at its size before the rules). Keys the
    size sets itself are left to it. ConfigError when parameters do not match or the schedule does not fit."""
    own = ladder.sizes[size]
    N = size_parameters(config, ladder.baseline)[ladder.parameters]
    mine, theirs = matrix_parameters(config.model), matrix_parameters(dataclasses.replace(config.model, activation=ladder.baseline))
    if abs(mine - theirs) > 1e-3 * theirs:
        raise ConfigError(f"ladder size {size}: {config.model.activation}'s weight matrices hold {mine:,} parameters and "
                          f"{ladder.baseline}'s {theirs:,}: not parameter-matched (use model.ffn_hidden_size, not ffn_width)")
    training = config.training
    settings: dict[str, Any] = {}
    batch = training.global_batch_tokens // training.seq_len if training.global_batch_tokens else training.global_batch_size
    if ladder.batch["rule"] == "power" and "training.global_batch_size" not in own:
        rule = ladder.batch
        multiple = int(rule["multiple_of"])
        batch = batch * (N / rule["reference_parameters"]) ** rule["exponent"]
        batch = max(multiple, int(round(batch / multiple)) * multiple)
        batch = int(min(max(batch, rule.get("min", 1)), rule.get("max", math.inf)))
    batch = own.get("training.global_batch_size", batch)
    settings.update({"training.global_batch_size": batch, "training.global_batch_tokens": None,
                     "training.micro_batch_size": own.get("training.micro_batch_size",
                                                          _micro_batch(batch, world_size, training.micro_batch_size))})
    tokens_per_step = batch * training.seq_len
    steps = own.get("training.max_steps", max(1, round(budget.tokens_for(N, ladder.tokens_per_parameter) / tokens_per_step)))
    if sweep:
        steps = max(1, round(steps * ladder.lr.get("budget_fraction", 1.0)))
    warmup_rule, = ladder.warmup.items()
    if warmup_rule[0] == "tokens_per_parameter":
        warmup = math.ceil(warmup_rule[1] * N / tokens_per_step)
    elif warmup_rule[0] == "fraction":
        warmup = round(warmup_rule[1] * steps)
    else:
        warmup = int(warmup_rule[1])
    warmup = own.get("schedule.warmup_steps", warmup)
    decay = round(ladder.schedule.get("decay_fraction", 0) * steps) if ladder.schedule["name"] == "wsd" else 0
    if warmup >= steps or warmup + decay > steps:
        raise ConfigError(f"ladder size {size}, budget {budget.label}: the run has {steps} steps, too few for its "
                          f"{warmup} warmup steps{f' and {decay} decay steps' if decay else ''}; raise the budget or "
                          f"lower ladder.warmup")
    settings.update({"training.max_steps": steps, "schedule.units": "steps", "schedule.name": ladder.schedule["name"],
                     "schedule.warmup_steps": warmup, "schedule.warmup_tokens": 0, "schedule.decay_steps": decay,
                     "schedule.decay_tokens": 0})
    rule = ladder.lr
    if rule["rule"] == "power":
        settings["optimizer.lr"] = float(f"{config.optimizer.lr * (N / rule['reference_parameters']) ** rule['exponent']:.4g}")
    elif rule["rule"] == "width":
        settings["optimizer.lr"] = float(f"{config.optimizer.lr * rule['reference_d_model'] / config.model.d_model:.4g}")
    return {key: value for key, value in settings.items() if key not in own}
