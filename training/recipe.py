"""Calibration recipes: YAML files naming the base model, data, sparse-memory options, the two phases,
and where outputs go. Every key is checked before the model is loaded; a wrong one raises an error
naming it.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sparsemem.modeling.configuration_sparsemem import OPTION_NAMES

from .data import DataSource

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 1e-4
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Phase1:
    """Scorer distillation: KL(dense block attention mass || scorer distribution)."""

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    queries_per_layer: int = 256
    mass_weighted: bool = True  # weigh each query's KL by the attention mass its cold blocks hold


@dataclass
class Phase2:
    """End to end: KL(dense teacher next-token distribution || sparse student), straight-through gates."""

    steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    kl_tokens: int = 512
    gate_temperature: float = 1.0
    # the sparse reference path keeps its attention graph for the backward pass: phase 2 may use shorter
    # sequences and fewer of them than phase 1 (None: the recipe's sequence_length / micro_batch_size)
    sequence_length: int | None = None
    micro_batch_size: int | None = None
    lora: LoraSettings | None = None


@dataclass
class DataSettings:
    train: list[DataSource] = field(default_factory=lambda: [DataSource("python-docs")])
    eval: DataSource | None = field(default_factory=lambda: DataSource("python-docs"))
    eval_tokens: int = 8192
    max_train_tokens: int | None = None


@dataclass
class EvalSettings:
    """Perplexity of dense vs training-free vs learned selection on held-out text."""

    lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    block_fraction: float = 0.1


@dataclass
class Recipe:
    base_model: str
    output_dir: str
    sparsemem: dict = field(default_factory=dict)
    data: DataSettings = field(default_factory=DataSettings)
    sequence_length: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    phase1: Phase1 = field(default_factory=Phase1)
    phase2: Phase2 = field(default_factory=Phase2)
    checkpoint_every: int = 50
    log_every: int = 1
    max_grad_norm: float = 1.0
    report_to: list[str] = field(default_factory=list)
    eval: EvalSettings | None = None

    @property
    def total_steps(self) -> int:
        return self.phase1.steps + self.phase2.steps


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"recipe: `{where}` must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {[f'{where}.{k}'.lstrip('.') for k in unknown]}; valid keys in "
                         f"`{where or 'top level'}`: {sorted(fields)}")
    return values


def _source(value, where: str) -> DataSource:
    if isinstance(value, str):
        return DataSource(value)
    _build(DataSource, value, where)
    if "name" not in value:
        raise ValueError(f"recipe: `{where}` needs a `name`")
    for key in ("name", "split", "text_field"):
        if key in value and (not isinstance(value[key], str) or not value[key]):
            raise ValueError(f"recipe: `{where}.{key}` must be a non-empty string, got {value[key]!r}")
    if value.get("max_chars") is not None:
        _number(f"{where}.max_chars", value["max_chars"], int, 1)
    return DataSource(**value)


def _number(where, value, kind, minimum=None, maximum=None, positive=False):
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if ok and positive and not value > 0:
        ok = False
    if not ok:
        bounds = f" in [{minimum}, {maximum}]" if maximum is not None else (f" >= {minimum}" if minimum is not None else "")
        bounds = " > 0" if positive else bounds
        raise ValueError(f"recipe: `{where}` must be a {getattr(kind, '__name__', 'number')}{bounds}, got {value!r}")


def _list_of(where, value, kind, allow_empty=False) -> None:
    if not isinstance(value, list) or not (value or allow_empty):
        raise ValueError(f"recipe: `{where}` must be a {'' if allow_empty else 'non-empty '}list, got {value!r}")
    for index, item in enumerate(value):
        if kind is int:
            _number(f"{where}[{index}]", item, int)
        elif not isinstance(item, kind):
            raise ValueError(f"recipe: `{where}[{index}]` must be a {kind.__name__}, got {item!r}")


def _check_lora(lora: LoraSettings) -> None:
    _number("phase2.lora.r", lora.r, int, 1)
    _number("phase2.lora.alpha", lora.alpha, (int, float), positive=True)
    _number("phase2.lora.dropout", lora.dropout, (int, float), 0, 1)
    if lora.dropout == 1:
        raise ValueError("recipe: `phase2.lora.dropout` must be below 1, got 1")
    _number("phase2.lora.lr", lora.lr, (int, float), positive=True)
    _list_of("phase2.lora.target_modules", lora.target_modules, str)


def _check_options(options: dict) -> None:
    """The sparse-memory options' values, checked as the model's config will check them."""
    from sparsemem.modeling.configuration_sparsemem import SparseMemOptions

    probe = SparseMemOptions(**options)
    probe.num_attention_heads = probe.num_key_value_heads = None  # the model's, checked when it loads
    try:
        probe.validate_sparsemem_options()
    except ValueError as error:
        raise ValueError(f"recipe: `sparsemem`: {error}") from None


def parse_recipe(values: dict, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping and build the `Recipe`. Relative data paths resolve against `base_dir`."""
    _build(Recipe, values, "")
    for key in ("base_model", "output_dir"):
        if not isinstance(values.get(key), str) or not values[key]:
            raise ValueError(f"recipe: `{key}` is required (a string)")
    values = dict(values)
    options = values.get("sparsemem", {}) or {}
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"recipe: unknown option(s) {['sparsemem.' + k for k in unknown]}; valid: {list(OPTION_NAMES)}")
    if options.get("selection_gate_temperature") is not None:
        raise ValueError("recipe: `sparsemem.selection_gate_temperature` is set by phase 2 while it trains; "
                         "give its temperature as `phase2.gate_temperature`")
    if options.get("scorer", "learned") != "learned":
        raise ValueError("recipe: `sparsemem.scorer` must be 'learned' (the scorer being calibrated)")
    values["sparsemem"] = {**options, "scorer": "learned"}
    _check_options(values["sparsemem"])

    data = _build(DataSettings, values.get("data", {}) or {}, "data")
    train = data.get("train", ["python-docs"])
    if isinstance(train, (str, dict)):
        train = [train]
    train = [_source(v, f"data.train[{i}]") for i, v in enumerate(train)]
    eval_source = data.get("eval", "python-docs")
    eval_source = None if eval_source is None else _source(eval_source, "data.eval")

    def _resolve(source):
        if source is None or source.name.startswith("hub:") or Path(source.name).is_absolute() or base_dir is None:
            return source
        if source.name in ("python-docs", "python-stdlib"):
            return source
        candidate = base_dir / source.name
        return dataclasses.replace(source, name=str(candidate)) if candidate.exists() else source

    train = [_resolve(s) for s in train]
    eval_source = _resolve(eval_source)
    for i, source in enumerate(train):
        try:
            source.check()
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"recipe: `data.train[{i}]`: {error}") from None
    if eval_source is not None:
        eval_source.check()
    values["data"] = DataSettings(train, eval_source, data.get("eval_tokens", 8192), data.get("max_train_tokens"))
    _number("data.eval_tokens", values["data"].eval_tokens, int, 1)
    if values["data"].max_train_tokens is not None:
        _number("data.max_train_tokens", values["data"].max_train_tokens, int, 1)

    phase2 = dict(_build(Phase2, values.get("phase2", {}) or {}, "phase2"))
    if phase2.get("lora") is not None:
        phase2["lora"] = LoraSettings(**_build(LoraSettings, phase2["lora"], "phase2.lora"))
        _check_lora(phase2["lora"])
    values["phase2"] = Phase2(**phase2)
    values["phase1"] = Phase1(**_build(Phase1, values.get("phase1", {}) or {}, "phase1"))
    if values.get("eval") is not None:
        values["eval"] = EvalSettings(**_build(EvalSettings, values["eval"], "eval"))
        _list_of("eval.lengths", values["eval"].lengths, int)
    if "report_to" in values:
        _list_of("report_to", values["report_to"], str, allow_empty=True)
    recipe = Recipe(**values)

    _number("sequence_length", recipe.sequence_length, int, 16)
    _number("micro_batch_size", recipe.micro_batch_size, int, 1)
    _number("gradient_accumulation_steps", recipe.gradient_accumulation_steps, int, 1)
    _number("checkpoint_every", recipe.checkpoint_every, int, 1)
    _number("log_every", recipe.log_every, int, 1)
    _number("seed", recipe.seed, int, 0)
    # a negative clipping norm flips every gradient (training then climbs the loss)
    _number("max_grad_norm", recipe.max_grad_norm, (int, float), positive=True)
    if not isinstance(recipe.gradient_checkpointing, bool):
        raise ValueError(f"recipe: `gradient_checkpointing` must be true or false, got {recipe.gradient_checkpointing!r}")
    for phase in ("phase1", "phase2"):
        settings = getattr(recipe, phase)
        _number(f"{phase}.steps", settings.steps, int, 0)
        _number(f"{phase}.lr", settings.lr, (int, float), 0)
        _number(f"{phase}.weight_decay", settings.weight_decay, (int, float), 0)
        _number(f"{phase}.warmup_steps", settings.warmup_steps, int, 0)
    _number("phase1.queries_per_layer", recipe.phase1.queries_per_layer, int, 1)
    if not isinstance(recipe.phase1.mass_weighted, bool):
        raise ValueError(f"recipe: `phase1.mass_weighted` must be true or false, got {recipe.phase1.mass_weighted!r}")
    _number("phase2.kl_tokens", recipe.phase2.kl_tokens, int, 1)
    _number("phase2.gate_temperature", recipe.phase2.gate_temperature, (int, float), 1e-6)
    if recipe.phase2.sequence_length is not None:
        _number("phase2.sequence_length", recipe.phase2.sequence_length, int, 16, recipe.sequence_length)
    if recipe.phase2.micro_batch_size is not None:
        _number("phase2.micro_batch_size", recipe.phase2.micro_batch_size, int, 1, recipe.micro_batch_size)
    if recipe.total_steps < 1:
        raise ValueError("recipe: `phase1.steps` + `phase2.steps` must be at least 1")
    if recipe.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"recipe: `mixed_precision` must be 'no', 'fp16' or 'bf16', got {recipe.mixed_precision!r}")
    if recipe.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"recipe: `dtype` must be 'float32', 'bfloat16' or 'float16', got {recipe.dtype!r}")
    bad = sorted(set(recipe.report_to) - {"tensorboard", "wandb"})
    if bad:
        raise ValueError(f"recipe: `report_to` accepts 'tensorboard' and 'wandb', got {bad}")
    if recipe.eval is not None:
        _number("eval.block_fraction", recipe.eval.block_fraction, (int, float), 1e-6, 1.0)
        for length in recipe.eval.lengths:
            _number("eval.lengths[]", length, int, 16)
        if recipe.data.eval is None:
            raise ValueError("recipe: `eval` needs held-out text: set `data.eval`")
        if max(recipe.eval.lengths) > recipe.data.eval_tokens:
            raise ValueError(f"recipe: `eval.lengths` {recipe.eval.lengths} exceed `data.eval_tokens` ({recipe.data.eval_tokens})")
    return recipe


def load_recipe(path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    try:
        return parse_recipe(values or {}, base_dir=path.parent)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise type(error)(f"{path}: {error}") from None


def check_architecture(config) -> None:
    """Refuse an unsupported base before any training step."""
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"recipe: `base_model` has model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
