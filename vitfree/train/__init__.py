"""Fine-tuning: one loop for a single process and for ``torchrun``, with exact-resume checkpoints."""
from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint
from .finetune import FinetuneConfig, FinetuneResult, create_finetune_model, evaluate, finetune

__all__ = ['FinetuneConfig', 'FinetuneResult', 'finetune', 'create_finetune_model', 'evaluate',
           'CheckpointError', 'CheckpointManager', 'load_checkpoint', 'save_checkpoint']
