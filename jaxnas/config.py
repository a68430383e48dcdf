"""The run configuration of ``jaxnas`` entry points: one frozen dataclass tree loaded from YAML.

``configs/quick.yaml`` is the embedded default. Every key is documented by its field's ``help`` metadata
(``python -m jaxnas.search --help-config`` lists them); ``interop.config`` checks types, ranges and choices and
names the key of any bad value. ``python -m jaxnas.data`` reads the same files and uses ``seed``, ``output``
and ``data`` only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxnas.blocks import FAMILIES as BLOCK_FAMILIES
from jaxnas.data.config import DataConfig

GRADIENT_STRATEGIES = ("darts", "pc_darts", "gdas")
"""The strategies of mode differentiable (jaxnas.search.differentiable); the others are ask / tell strategies."""
STRATEGIES = ("random", "evolution", "genetic", "nsga2", "local", "predictor", "bo", "progressive",
              *GRADIENT_STRATEGIES)
MODES = ("oneshot", "train", "table", "differentiable")
MACRO_FAMILIES = ("mlp", *BLOCK_FAMILIES)  # jaxnas.spaces.macro.FAMILIES, without importing jax here
SPACES = ("macro", "nb201", "transformer", "lm")
LM_OBJECTIVES = ("val_ppl:min", "params:min")
"""The objectives of a space.name=lm run that leaves objectives.objectives at its (image) default."""
IMAGE_ONLY_METRICS = ("val_accuracy", "macs", "latency_ms", "avg_macs")
LM_ONLY_METRICS = ("val_ppl", "macs_per_token", "kv_bytes_per_token", "latency_ms_per_token")


def _field(default, help: str, **limits):
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        raise TypeError("mutable defaults need default_factory")
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def _section(cls, help: str):
    return dataclasses.field(default_factory=cls, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    """Which search space, and the option lists of its choices (shrink them for small budgets).

    The transformer and lm spaces share max_layers, hidden, heads, ffn_mults, norms and positions; the lm space
    adds kv_heads, lm_activations and mixers."""

    name: Literal[SPACES] = _field(
        "macro", "Search space: macro, nb201, transformer (images) or lm (causal language models on text data)."
    )
    families: tuple[Literal[MACRO_FAMILIES], ...] = _field(
        MACRO_FAMILIES, "macro: network families searched."
    )
    max_stages: int = _field(3, "macro: most stages.", min=1, max=6)
    max_depth: int = _field(3, "macro: most blocks per stage.", min=1, max=8)
    channels: tuple[int, ...] = _field((16, 24, 32, 48, 64), "macro: channel options of conv stages.")
    units: tuple[int, ...] = _field((64, 128, 256, 512), "macro: unit options of MLP stages.")
    kernels: tuple[int, ...] = _field((3, 5, 7), "macro: kernel sizes (odd) of conv stages.")
    expansions: tuple[int, ...] = _field((1, 3, 6), "macro: mobilenet expansion ratios.")
    activations: tuple[Literal["relu", "gelu", "silu", "elu", "leaky_relu"], ...] = _field(
        ("relu", "gelu", "silu", "elu", "leaky_relu"), "macro: activation options."
    )
    dropouts: tuple[float, ...] = _field((0.0, 0.1, 0.2), "macro: dropout rates before the classifier.")
    batchnorm: tuple[bool, ...] = _field(
        (False, True), "macro: options of every stage's BatchNorm choice ([true]: always on, as weight-sharing "
        "searches usually fix it; a supernet shares weights poorly between normalised and raw paths)."
    )
    skip: tuple[bool, ...] = _field((False, True), "macro: options of the mlp / cnn stages' skip-connection choice.")
    stem_stride: int = _field(1, "macro conv families: stride of the fixed 3x3 stem (2 quarters the MACs).", min=1, max=2)
    max_layers: int = _field(4, "transformer, lm: most layers.", min=1, max=48)
    hidden: tuple[int, ...] = _field((32, 64), "transformer, lm: model width options.")
    heads: tuple[int, ...] = _field((1, 2, 4), "transformer, lm: attention head options (per layer; must divide "
                                    "hidden).")
    ffn_mults: tuple[int, ...] = _field((1, 2, 4), "transformer, lm: FFN width multiplier options (per layer).")
    norms: tuple[Literal["layernorm", "rmsnorm"], ...] = _field(("layernorm", "rmsnorm"), "transformer, lm: norms.")
    transformer_activations: tuple[Literal["gelu", "silu", "swiglu"], ...] = _field(
        ("gelu", "silu", "swiglu"), "transformer: FFN activations."
    )
    positions: tuple[Literal["learned", "rope", "alibi"], ...] = _field(
        ("learned", "rope", "alibi"), "transformer, lm: position encodings (lm: alibi with the attention mixer only)."
    )
    kv_heads: tuple[int, ...] = _field(
        (1, 2, 4), "lm: key / value head options per layer (must divide the layer's heads; = heads: MHA, 1: MQA)."
    )
    lm_activations: tuple[Literal["gelu", "silu", "swiglu", "geglu"], ...] = _field(
        ("gelu", "silu", "swiglu", "geglu"), "lm: FFN activations."
    )
    mixers: tuple[Literal["attention", "linear", "recurrent"], ...] = _field(
        ("attention", "linear", "recurrent"), "lm: token mixers (causal softmax attention, causal linear attention, "
        "gated linear recurrence)."
    )
    cell_channels: int = _field(16, "nb201 (modes oneshot / train): channels C of the first stage (NB201: 16).", min=1)
    cells: int = _field(5, "nb201 (modes oneshot / train): cells N per stage (NB201: 5).", min=1)
    patch: int = _field(4, "transformer on images: side of the square patches (ViT-style).", min=1)

    def __post_init__(self):
        if not self.families:
            raise ValueError("families is empty; list at least one of mlp, cnn, resnet, mobilenet")
        for name in ("channels", "units", "kernels", "expansions"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
        if any(k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be odd (centred padding), got {list(self.kernels)}")
        if not self.dropouts or any(not 0.0 <= d < 1.0 for d in self.dropouts):
            raise ValueError(f"dropouts must be rates in [0, 1), got {list(self.dropouts)}")
        if self.name == "lm":
            for name in ("hidden", "heads", "kv_heads", "ffn_mults", "norms", "lm_activations", "mixers", "positions"):
                values = getattr(self, name)
                if not values or (name in ("hidden", "heads", "kv_heads", "ffn_mults") and min(values) < 1):
                    raise ValueError(f"space.{name} must be a non-empty list (of positive integers for sizes), got "
                                     f"{list(values)}")


MAX_POPULATION = 65_536  # a strategy state and one generation's rows stay far below memory; training checks its own


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The strategy and the budget."""

    strategy: Literal[STRATEGIES] = _field(
        "evolution", "Search strategy: " + ", ".join(STRATEGIES) + " (the last three: mode differentiable only)."
    )
    population: int = _field(8, "Candidates asked per generation (the vmapped population size P).", min=1,
                             max=MAX_POPULATION)
    budget: int = _field(32, "Distinct architectures evaluated (table mode: queries) before the search stops.", min=1)
    generations: int | None = _field(None, "Stop after this many generations too (None: only the budget).", min=1)
    stall_generations: int = _field(
        50, "Stop when this many generations in a row add no new evaluation (the strategy only repeats architectures "
        "it has seen, or asks infeasible ones); a run also stops once every architecture of the space was seen.", min=1
    )
    prefilter: Literal["none", "grad_norm", "snip", "synflow", "naswot"] = _field(
        "none", "Modes train / oneshot: score each generation's new candidates with this zero-cost proxy (the untrained "
        "network, one batch) and evaluate only the best prefilter_keep of them; the rest are told -inf (status "
        "filtered) and cost no budget. naswot: macro and nb201 spaces."
    )
    prefilter_keep: float = _field(0.5, "prefilter: fraction of a generation's new candidates kept (rounded up).",
                                   min=0.01, max=1.0)
    sample_size: int = _field(3, "evolution: members per parent tournament.", min=1)
    pool_size: int | None = _field(
        None, "evolution: members kept (aging); genetic: population incl. elites. None: 2 x population.", min=2
    )
    elites: int = _field(2, "genetic / progressive: members carried over unchanged.", min=0)
    crossover_rate: float = _field(0.5, "genetic / nsga2: probability that compatible parents are crossed.", min=0.0, max=1.0)
    generations_per_level: int = _field(2, "progressive: generations before the next complexity level opens.", min=1)
    surrogate: Literal["mlp", "gp"] = _field(
        "mlp", "predictor: the surrogate that screens mutants, mlp (an ensemble of small MLPs) or gp (a Gaussian "
        "process, the one of strategy bo); either way its Spearman on each told batch is logged."
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How candidates are trained (mode train, and the final retraining of every mode but table)."""

    epochs: int = _field(4, "Epochs per candidate in the search.", min=1)
    batch_size: int = _field(64, "Training batch size.", min=1)
    learning_rate: float = _field(1e-3, "Adam learning rate.", min=0.0)
    patience: int | None = _field(
        None, "Early stopping: epochs without a better validation accuracy (validation loss for a language model).",
        min=1)
    fast_generations: int = _field(0, "Fast mode: the first N generations train for fast_epochs instead.", min=0)
    fast_epochs: int = _field(1, "Fast mode: epochs per candidate in the first fast_generations.", min=1)
    augment_shift: int = _field(0, "Augmentation: random translations of up to this many pixels (0: off).", min=0, max=8)
    fidelity: Literal["full", "successive_halving", "hyperband"] = _field(
        "full", "Mode train: full (every candidate trains for epochs); successive_halving (all for min_epochs, the "
        "best 1/eta for eta times as many, ... the last rung for epochs; each rung from scratch; a candidate keeps "
        "the score of the highest rung it reached); hyperband (the generation split into successive-halving "
        "brackets that start at each rung, from all-at-min_epochs to a few at full epochs)."
    )
    eta: int = _field(2, "successive_halving / hyperband: 1/eta of a rung's candidates go on to the next.", min=2)
    min_epochs: int = _field(1, "successive_halving / hyperband: epochs of the first rung.", min=1)
    warm_start: bool = _field(False, "Start candidates from the trained supernet's weights (oneshot supernet first).")

    __moved__ = {"formulation": "population.backend (exact -> sized, vmapped -> masked)"}


@dataclasses.dataclass(frozen=True)
class SupernetConfig:
    """Weight-sharing training of the supernet (mode oneshot, and train with warm_start)."""

    epochs: int = _field(5, "Epochs of supernet training.", min=1)
    sampler: Literal["uniform", "sandwich"] = _field("sandwich", "Subnets per step: uniform, or largest + smallest + random.")
    subnets: int = _field(3, "Subnets trained per step.", min=1)
    batch_size: int = _field(64, "Supernet training batch size.", min=1)
    learning_rate: float = _field(1e-3, "Adam learning rate (the peak of the schedule).", min=0.0)
    schedule: Literal["constant", "cosine"] = _field(
        "cosine", "Learning-rate schedule: constant, or cosine (linear warm-up over warmup_epochs, then cosine decay "
        "to zero at the last step)."
    )
    warmup_epochs: float = _field(0.5, "cosine: epochs of linear warm-up from zero.", min=0.0)
    distill: float = _field(
        0.0, "In-place distillation (sandwich rule): weight of the largest subnet's soft predictions in every other "
        "subnet's loss (0: labels only; 1: the teacher only).", min=0.0, max=1.0,
    )
    augment_shift: int = _field(0, "Augmentation: random translations of up to this many pixels (0: off).", min=0, max=8)
    bn_batches: int = _field(4, "Training batches used to recalibrate each subnet's BatchNorm statistics.", min=1)

    __moved__ = {"scoring": "population.backend (exact -> sized, vmapped -> masked)"}


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """How a population of candidates is computed: trained (mode train, final retraining) and scored with
    recalibrated BatchNorm statistics (mode oneshot with the shared weights; trained candidates; the final test)."""

    backend: Literal["auto", "masked", "sized"] = _field(
        "auto",
        "masked: one vmapped program for the whole population, every candidate at the supernet's largest sizes with "
        "masks (jaxnas.population.masked: the form for GPU / TPU and sharded populations; every space); sized: each "
        "candidate at its own sizes (jaxnas.population.sized / sized_train: the fast form on CPU; macro space; lm: "
        "training only, jaxnas.population.lm_sized); auto: sized for the macro and lm spaces on a CPU backend in one "
        "process (training: on one device), else masked. "
        "Both compute the same networks (scores equal to float tolerance).",
    )


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """Mode table: a tabular benchmark in our CSV format (arch = the space's canonical string + metrics)."""

    path: str = _field("nb201_analog", "A CSV path, or a shipped table name (nb201_analog).")
    signal: str = _field("baseline_acc", "Column used as the search signal (maximised).")
    report: str = _field("baseline_acc", "Column reported for the chosen architecture.")


@dataclasses.dataclass(frozen=True)
class ObjectivesConfig:
    """What is optimised and what must hold."""

    objectives: tuple[str, ...] = _field(
        ("val_accuracy", "params:min"),
        "Objectives 'name[:max|min]'; the first is the fitness of single-objective strategies, all of them "
        "define the Pareto front (nsga2 optimises all). Names: val_accuracy, val_loss, params, macs, "
        "latency_ms, size_bytes; table mode: signal, report; space.name=lm: val_ppl, val_loss, params, "
        "macs_per_token, kv_bytes_per_token, size_bytes, latency_ms_per_token (default there: val_ppl:min, "
        "params:min).",
    )
    constraints: tuple[str, ...] = _field(
        (), "Hard constraints 'name<=value' or 'name>=value', e.g. params<=1e5, latency_ms<=2."
    )
    latency_repeats: int = _field(20, "Timed calls (median) per latency measurement on the standalone twin.", min=3)
    latency_batch: int = _field(1, "Batch size of the latency measurement.", min=1)
    exit_epochs: int = _field(10, "avg_macs: epochs of each candidate's exit-head training (backbone frozen).",
                              min=1)
    exit_train_images: int = _field(2048, "avg_macs: training images the exit heads of each candidate see.", min=1)
    exit_grid: int = _field(4, "avg_macs: exit heads read features averaged over a grid x grid partition.", min=1)
    exit_max_drop: float = _field(0.5, "avg_macs: guardrail, max validation accuracy drop (points) of the exits.")
    exit_guardrail_z: float = _field(1.645, "avg_macs: the guardrail holds the drop plus this many standard errors.")
    quant: Literal["fp32", "bf16", "int8", "int4"] = _field(
        "fp32", "space.name=lm: weight precision of size_bytes (jaxnas.quant: matrices stored at it, the rest "
        "float32) and of the winner's measured quantised test perplexity (its dequantised weights evaluated)."
    )


@dataclasses.dataclass(frozen=True)
class FinalConfig:
    """After the search (modes oneshot and train): retrain the top-k from scratch, evaluate on test."""

    top_k: int = _field(2, "Architectures retrained from scratch (0: skip).", min=0)
    epochs: int = _field(10, "Epochs of the final retraining.", min=1)
    patience: int | None = _field(
        3, "Early stopping of the final retraining on validation accuracy (validation loss for a language model).",
        min=1)
    seeds: int = _field(2, "Independent retrainings (initialisation, batch order, dropout) of every final "
                        "architecture; mean and spread are reported, the winner has the best mean validation accuracy.",
                        min=1)
    baselines: tuple[Literal["largest", "random"], ...] = _field(
        ("largest", "random"),
        "Baselines retrained with the final recipe next to the winner: largest (the largest network of the space), "
        "random (mode oneshot: the best of search.budget random architectures by the same one-shot scores).",
    )
    reference: tuple[str, ...] = _field((), "Named reference architectures (canonical strings) retrained as baselines.")
    control: int = _field(
        8, "Ranking fidelity: candidates spread over the search's scores retrained stand-alone; Kendall tau / "
        "Spearman between the two go to summary.json (0: off).", min=0,
    )


@dataclasses.dataclass(frozen=True)
class DifferentiableConfig:
    """Mode differentiable: gradient-based search over the nb201 cell (search.strategy darts, pc_darts or gdas) or the
    macro space's conv families (darts or gdas: every choice relaxed, jaxnas.supernet.conv.ConvSupernet.apply_relaxed).

    The network weights learn on the train split (SGD with momentum, cosine schedule), the architecture
    parameters on the validation split (Adam), one step of each per training batch (jaxnas.search.differentiable).
    """

    epochs: int = _field(10, "Search epochs: passes over the train split (the architecture steps cycle through the "
                         "validation split alongside).", min=1)
    batch_size: int = _field(64, "Batch size of the weight steps (train split) and the architecture steps "
                             "(validation split).", min=1)
    learning_rate: float = _field(0.025, "Weights: SGD learning rate at the start, cosine-decayed per step to "
                                  "min_learning_rate (DARTS: 0.025).", min=0.0)
    min_learning_rate: float = _field(0.001, "Weights: learning rate at the last step.", min=0.0)
    momentum: float = _field(0.9, "Weights: SGD momentum.", min=0.0, max=1.0)
    weight_decay: float = _field(3e-4, "Weights: L2 weight decay (added to the gradient).", min=0.0)
    grad_clip: float = _field(5.0, "Weights: gradients clipped to this global norm (0: no clipping).", min=0.0)
    arch_learning_rate: float = _field(
        3e-3, "Architecture parameters: Adam learning rate (betas 0.5, 0.999). DARTS used 3e-4 for ~20k steps (50 "
        "CIFAR-10 epochs); short searches on small data need more.", min=0.0,
    )
    arch_weight_decay: float = _field(1e-3, "Architecture parameters: L2 weight decay (added to the gradient).",
                                      min=0.0)
    warmup_epochs: int = _field(0, "Epochs of weight steps only before the architecture parameters start to learn "
                                "(PC-DARTS: 15 of 50).", min=0)
    second_order: bool = _field(
        False, "darts / pc_darts: second-order architecture gradient (one unrolled virtual SGD step of the weights, "
        "the Hessian-vector product by finite differences, Liu et al.); about 2.5x the cost of a first-order step.",
    )
    pc_k: int = _field(4, "pc_darts: 1 / pc_k of every edge's channels go through its mixed op (the rest bypass "
                       "it, then a channel shuffle); must divide space.cell_channels.", min=1)
    edge_normalisation: bool = _field(True, "pc_darts: scale each edge by a learnt softmax over the edges into its "
                                      "node (the betas of PC-DARTS).")
    tau_max: float = _field(10.0, "gdas: Gumbel-softmax temperature of the first epoch.", min=1e-6)
    tau_min: float = _field(0.1, "gdas: temperature of the last epoch (linear in between).", min=1e-6)
    exclude_none: bool = _field(
        True, "Derivation: the op of each edge is its argmax over the ops other than none (DARTS); false: over all "
        "five ops (NAS-Bench-201's own code), so an edge may be dropped.",
    )
    cost_weight: float = _field(
        0.0, "macro space: add cost_weight x E[MACs] / (MACs of the space's largest network) to the architecture "
        "loss, so the search trades accuracy for cost (FBNet / ProxylessNAS style; 0: accuracy only).", min=0.0,
    )
    stop_skips: int | None = _field(
        None, "Collapse guard (DARTS+): stop the search after the first epoch whose derived cell has at least this "
        "many skip_connect edges (of 6); None: run every epoch. The share of parameter-free ops is recorded "
        "either way.", min=1, max=6,
    )

    def __post_init__(self):
        if self.tau_min > self.tau_max:
            raise ValueError(f"differentiable.tau_min={self.tau_min} exceeds differentiable.tau_max={self.tau_max}; "
                             "the temperature anneals from tau_max down to tau_min")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"differentiable.min_learning_rate={self.min_learning_rate} exceeds "
                             f"differentiable.learning_rate={self.learning_rate}; the schedule decays to it")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) searching together on JAX's distributed runtime (`jaxnas.distributed`)."""

    coordinator: str = _field("", "host:port of process 0's coordinator; empty: one process (or auto-detected).")
    num_processes: int = _field(1, "Processes taking part (with coordinator).", min=1)
    process_id: int = _field(0, "This process's index, 0 .. num_processes - 1 (with coordinator).", min=0)
    auto: bool = _field(True, "Without a coordinator, join a cluster JAX detects itself (SLURM, Open MPI, TPU pod).")
    heartbeat_timeout: int = _field(100, "Seconds without a heartbeat before a lost process fails the run.", min=2)
    initialization_timeout: int = _field(300, "Seconds to wait for every process to join.", min=2)

    def __post_init__(self):
        if self.coordinator:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"distributed.coordinator: got {self.coordinator!r}; expected host:port, "
                                 "e.g. localhost:12355 or 10.0.0.1:1234")
        elif self.num_processes > 1:
            raise ValueError(f"distributed.num_processes={self.num_processes} needs distributed.coordinator=host:port "
                             "(the address of process 0)")
        if self.process_id >= self.num_processes:
            raise ValueError(f"distributed.process_id: got {self.process_id}; expected 0 .. "
                             f"{self.num_processes - 1} (distributed.num_processes={self.num_processes})")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Top level of a jaxnas run configuration."""

    seed: int = _field(0, "Seed of every random choice in the run (a JAX PRNG seed: 32 bits).", min=0, max=2**32 - 1)
    output: str = _field("runs/quick", "Run folder: everything the run writes goes here.")
    mode: Literal[MODES] = _field(
        "train", "Evaluation: oneshot (trained supernet, inherited weights), train (population training), table, "
        "differentiable (gradient-based search of the nb201 cell or the macro conv families: search.strategy darts, "
        "pc_darts or gdas)."
    )
    data: DataConfig = _section(DataConfig, "The dataset.")
    space: SpaceConfig = _section(SpaceConfig, "The search space.")
    search: SearchConfig = _section(SearchConfig, "The strategy and budget.")
    train: TrainConfig = _section(TrainConfig, "Candidate training.")
    supernet: SupernetConfig = _section(SupernetConfig, "Supernet (weight-sharing) training.")
    population: PopulationConfig = _section(PopulationConfig, "How populations are trained and scored (backend).")
    table: TableConfig = _section(TableConfig, "Tabular benchmark (mode table).")
    objectives: ObjectivesConfig = _section(ObjectivesConfig, "Objectives and constraints.")
    final: FinalConfig = _section(FinalConfig, "Final retraining and test evaluation.")
    differentiable: DifferentiableConfig = _section(DifferentiableConfig,
                                                    "Gradient-based search (mode differentiable).")
    distributed: DistributedConfig = _section(DistributedConfig, "Multi-process (multi-host) runs.")
    progress: bool = _field(True, "Show a progress bar.")

    def __post_init__(self):
        if not self.output.strip():
            raise ValueError("RunConfig.output: got an empty path; expected a folder for the run's files, e.g. runs/quick")
        if self.mode == "table" and self.space.name != "nb201" and self.table.path == "nb201_analog":
            raise ValueError(
                f"mode table with the shipped nb201_analog table needs space.name=nb201, got {self.space.name!r}"
            )
        if self.mode == "table" and self.search.prefilter != "none":
            raise ValueError(
                f"search.prefilter={self.search.prefilter} scores untrained networks; mode table has none. "
                "Use search.prefilter=none, or mode train / oneshot"
            )
        if self.search.prefilter == "naswot" and self.space.name == "transformer":
            raise ValueError(
                "search.prefilter=naswot needs binary activation codes, which the transformer supernet does not "
                "record; use search.prefilter=grad_norm, snip or synflow"
            )
        self._check_differentiable()
        self._check_text()
        self._check_exits()
        if self.population.backend == "sized" and self.space.name not in ("macro", "lm"):
            raise ValueError(
                f"population.backend=sized computes macro-space and language-model candidates at their own sizes, "
                f"got space.name={self.space.name!r}; use population.backend=auto or masked"
            )

    def named_metrics(self) -> list[tuple[str, str]]:
        """``(key, metric)`` for every metric objectives.objectives and objectives.constraints name."""
        named = [("objectives.objectives", o.split(":")[0].strip()) for o in self.objectives.objectives]
        return named + [("objectives.constraints", c.split("<")[0].split(">")[0].strip())
                        for c in self.objectives.constraints]

    def _check_exits(self):
        """avg_macs attaches early exits to conv twins after training: macro space, modes train / oneshot."""
        if "avg_macs" not in {metric for _, metric in self.named_metrics()}:
            return
        if self.space.name != "macro" or self.mode not in ("train", "oneshot"):
            raise ValueError(f"avg_macs (MACs per image with early exits) is measured for the macro space in mode train "
                             f"or oneshot, got space.name={self.space.name}, mode={self.mode}; use space.name=macro "
                             "with mode=train or oneshot, or the objective macs")
        if not self.objectives.exit_max_drop >= 0 or not self.objectives.exit_guardrail_z >= 0:
            raise ValueError(f"objectives.exit_max_drop (points) and objectives.exit_guardrail_z (standard errors) "
                             f"must be >= 0, got {self.objectives.exit_max_drop} and {self.objectives.exit_guardrail_z}")

    def _check_text(self):
        """Text data goes with the lm space and the lm space with text data; an lm run measures its own metrics
        (val_ppl, macs_per_token, ...) and its objectives default to LM_OBJECTIVES."""
        lm, data = self.space.name == "lm", self.data.name
        if lm and not (self.data.is_text or data.startswith("hf:")):
            raise ValueError(f"space.name=lm searches language models on text, got data.name={data!r} (image data); "
                             "set data.name=text:pydoc, text:<file or folder> or hf:<dataset with a text column>")
        if not lm and self.data.is_text:
            raise ValueError(f"data.name={data!r} is text, which only space.name=lm searches (got space.name="
                             f"{self.space.name}); set space.name=lm, or an image dataset such as data.name=mnist5k")
        if lm and self.objectives.objectives == ObjectivesConfig.objectives:  # the image default: use the lm one
            object.__setattr__(self, "objectives", dataclasses.replace(self.objectives, objectives=LM_OBJECTIVES))
        named = self.named_metrics()
        if not lm:
            for key, metric in named:
                if metric in LM_ONLY_METRICS:
                    raise ValueError(f"{key} names {metric}, a language-model metric; it needs space.name=lm (got "
                                     f"space.name={self.space.name})")
            return
        for key, metric in named:
            if metric in IMAGE_ONLY_METRICS:
                raise ValueError(f"{key} names {metric}, an image metric; space.name=lm measures val_ppl, val_loss, "
                                 "params, macs_per_token, kv_bytes_per_token, size_bytes, latency_ms_per_token")
        if self.mode not in ("train", "oneshot"):
            raise ValueError(f"space.name=lm runs in mode train or oneshot, got mode={self.mode}")
        if self.search.prefilter != "none":
            raise ValueError(f"search.prefilter={self.search.prefilter} is not available for space.name=lm; use "
                             "search.prefilter=none")
        if self.train.augment_shift or self.supernet.augment_shift:
            raise ValueError("train.augment_shift / supernet.augment_shift translate images; space.name=lm needs 0")

    def _check_differentiable(self):
        """Mode differentiable and the gradient strategies go together, on the nb201 space, without what they
        cannot do (constraints, pre-filter, warm start)."""
        strategy, gradient = self.search.strategy, self.search.strategy in GRADIENT_STRATEGIES
        if gradient and self.mode != "differentiable":
            raise ValueError(f"search.strategy={strategy} is a gradient-based search: it needs mode=differentiable, "
                             f"got mode={self.mode}")
        if self.mode != "differentiable":
            return
        if not gradient:
            raise ValueError(f"mode=differentiable needs search.strategy={' | '.join(GRADIENT_STRATEGIES)}, got "
                             f"search.strategy={strategy} (an ask / tell strategy: use mode train or oneshot for it)")
        if self.space.name not in ("nb201", "macro"):
            raise ValueError(f"mode=differentiable searches the NAS-Bench-201 cell or the macro space's conv families, "
                             f"got space.name={self.space.name}; set space.name=nb201 or macro")
        if self.space.name == "macro":
            if "mlp" in self.space.families or not set(self.space.families) & {"cnn", "resnet", "mobilenet"}:
                raise ValueError(f"mode=differentiable relaxes the macro space's conv families, got space.families="
                                 f"{list(self.space.families)}; use a subset of [cnn, resnet, mobilenet]")
            if strategy == "pc_darts":
                raise ValueError("search.strategy=pc_darts samples channels of a cell's edges (space.name=nb201); for "
                                 "the macro space use darts or gdas")
            if self.differentiable.stop_skips is not None:
                raise ValueError("differentiable.stop_skips guards the nb201 cell against skip connections; the macro "
                                 "space has no such collapse. Leave it unset (null)")
        elif self.differentiable.cost_weight:
            raise ValueError("differentiable.cost_weight weighs the macro space's expected MACs; the nb201 cell's "
                             "relaxation has no cost term. Set differentiable.cost_weight=0")
        if self.objectives.constraints:
            raise ValueError(f"objectives.constraints={list(self.objectives.constraints)}: mode=differentiable cannot "
                             "enforce constraints (its architecture follows the gradient); drop them, or use mode "
                             "train / oneshot")
        if self.search.prefilter != "none":
            raise ValueError(f"search.prefilter={self.search.prefilter} filters asked candidates; mode=differentiable "
                             "asks none. Use search.prefilter=none")
        if self.train.warm_start:
            raise ValueError("train.warm_start=true starts candidates from a oneshot supernet; mode=differentiable "
                             "trains none. Use train.warm_start=false")
        d = self.differentiable
        if d.second_order and strategy == "gdas":
            raise ValueError("differentiable.second_order=true needs search.strategy=darts or pc_darts (gdas samples "
                             "its cell, so its gradient is first order); set differentiable.second_order=false")
        if strategy == "pc_darts" and self.space.cell_channels % d.pc_k:
            raise ValueError(f"differentiable.pc_k={d.pc_k} must divide space.cell_channels={self.space.cell_channels} "
                             "(each edge's channels split into pc_k equal groups)")
