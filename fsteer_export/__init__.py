"""FineSteer activation steering for Hugging Face causal LMs.

Importing the package registers the ``FINESTEER`` PEFT method, so that
``PeftModel.from_pretrained(base, adapter_folder)`` works in any process that ran ``import fsteer_export``.
"""

from . import peft_method as _peft_method  # noqa: F401  (registers FINESTEER with PEFT)
