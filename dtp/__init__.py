"""dtp: tensor parallelism for PyTorch on DTensor and DeviceMesh, at hand-written speed."""

from torch.distributed.tensor import Partial, Replicate, Shard

from dtp.ops.embedding import column_embedding, vocab_parallel_embedding
from dtp.ops.linear import column_linear, row_linear
from dtp.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from dtp.checkpoint.full import full_state_dict, load_full_state_dict, packed_layouts
from dtp.checkpoint.sharded import CheckpointError, CheckpointMismatch, load_checkpoint, save_checkpoint
from dtp.compose import clip_grad_norm_, fully_shard, parallelize_2d
from dtp.compose_ep import fully_shard_experts
from dtp.data_parallel import replicate_over
from dtp.ops.loss import vocab_parallel_cross_entropy
from dtp.mesh import default_mesh, init_mesh
from dtp.plan.mistakes import PlanMistake
from dtp.plan.parallelize import applied_styles, explain_plan, parallelize_module
from dtp.replica_check import ReplicaMismatch, check_replicas
from dtp.verify import VerifyReport, verify
from dtp.plan.module_io import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput
from dtp.plan.style import ParallelStyle
from dtp.plan.styles import ColwiseParallel, ReplicateParallel, RowwiseParallel, SequenceParallel, VocabParallel
from dtp.ops.packed import PackedLayout
from dtp.plan.packed_styles import PackedColwiseParallel, PackedRowwiseParallel
from dtp.plan.unit_styles import UnitColwiseParallel, UnitRowwiseParallel
from dtp.plan.expert_styles import ExpertParallel, ExpertTensorParallel

__all__ = [
    # layers and their functional core
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "column_linear", "row_linear", "vocab_parallel_embedding", "column_embedding",
    "vocab_parallel_cross_entropy",
    # meshes and plans
    "default_mesh", "init_mesh", "parallelize_module", "explain_plan", "applied_styles", "PlanMistake",
    "ParallelStyle", "ColwiseParallel", "RowwiseParallel", "VocabParallel", "SequenceParallel",
    "ReplicateParallel", "PrepareModuleInput", "PrepareModuleOutput", "PrepareModuleInputOutput",
    "PackedColwiseParallel", "PackedRowwiseParallel", "PackedLayout", "packed_layouts", "UnitColwiseParallel",
    "UnitRowwiseParallel", "ExpertParallel", "ExpertTensorParallel",
    # 2-D composition and the reference verifier
    "parallelize_2d", "fully_shard", "fully_shard_experts", "replicate_over", "clip_grad_norm_", "verify",
    "VerifyReport", "check_replicas",
    "ReplicaMismatch",
    # checkpoints
    "full_state_dict", "load_full_state_dict", "save_checkpoint", "load_checkpoint", "CheckpointMismatch",
    "CheckpointError",
    # torch's placements, re-exported for plans
    "Shard", "Replicate", "Partial",
]
