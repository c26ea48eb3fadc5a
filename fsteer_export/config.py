"""The adapter's configuration: one dataclass for the eager runtime, PEFT and ONNX export.

It subclasses ``peft.PeftConfig`` so ``adapter_config.json`` is a genuine PEFT config file
(``peft_type: "FINESTEER"``). Structural fields rebuild the module shapes; the ``base_*`` fields
let loaders refuse an adapter trained for another model with one clear line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

FORMAT_VERSION = 1
GATE_POOLS = ("last", "mean")  # what the gate reads at layer G (see steering.prompt_pool_weights)
PEFT_TYPE_NAME = "FINESTEER"


def finesteer_peft_type():
    """``PeftType.FINESTEER``: PeftType is a closed ``str`` enum, so we extend it in place."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


FINESTEER = finesteer_peft_type()


@dataclass
class FineSteerConfig(PeftConfig):
    """Everything needed to rebuild a FineSteer head and check it fits the base model."""

    layer: int = field(default=10, metadata={"help": "steering layer L: the vector is added to its output"})
    gate_layer: int | None = field(default=None, metadata={"help": "layer G ≤ L whose input the gate reads (None: L)"})
    hidden_size: int = field(default=0, metadata={"help": "d of the base model"})
    gate_kind: str = field(default="quantile", metadata={"help": "quantile | logistic | soft"})
    gate_pool: str = field(default="last", metadata={
        "help": "what the gate reads at layer G: 'last' (the last prompt token's state) or 'mean' (the "
                "mean over the prompt's tokens, the first one excluded)"})
    gate_rank: int = field(default=16, metadata={"help": "r, SCS subspace rank"})
    calib_size: int = field(default=0, metadata={"help": "number of stored calibration scores"})
    experts: int = field(default=4, metadata={"help": "K prototype experts"})
    residual_rank: int = field(default=12, metadata={"help": "k, residual PCA basis size"})
    key_dim: int = field(default=64, metadata={"help": "d_k of the low-rank router"})
    mlp_hidden: int = field(default=64, metadata={"help": "hidden width of the β MLP"})
    strength: float = field(default=1.0, metadata={"help": "λ"})
    task: str = field(default="safety", metadata={"help": "what the adapter steers"})
    base_model_type: str = field(default="", metadata={"help": "config.model_type of the base model"})
    base_num_layers: int = field(default=0, metadata={"help": "decoder layers of the base model"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "fsteer adapter format"})
    training: dict = field(default_factory=dict, metadata={"help": "what training chose and measured"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FINESTEER
        if self.gate_layer is None:
            self.gate_layer = self.layer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's entry point (``PeftModel.from_pretrained`` / ``load_adapter``): validate the whole folder
        first, config and safetensors weights, because PEFT's own loader would fall back to a pickle-based
        ``adapter_model.bin`` and only warn about missing tensors."""
        from .peft_method import validated_folder

        folder, cfg = validated_folder(pretrained_model_name_or_path, subfolder, **kwargs)
        cfg._source = str(folder)  # not a dataclass field: never saved; names the folder in errors
        return cfg

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def target_modules(self):
        return None

    @target_modules.setter
    def target_modules(self, value) -> None:  # peft may try to normalise it
        pass
