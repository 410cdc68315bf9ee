"""Several processes, one model: context-parallel inference (:mod:`.context_parallel`), sharded data-free
quantization (:mod:`.sharded`) and the ``quantize --nproc N`` process launcher (:mod:`.launcher`)."""
from .context_parallel import disable_context_parallel, enable_context_parallel
from .launcher import quantize_multiprocess
from .sharded import partition_layers, quantize_sharded

__all__ = ["enable_context_parallel", "disable_context_parallel", "partition_layers", "quantize_sharded",
           "quantize_multiprocess"]
