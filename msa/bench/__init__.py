"""Performance benchmark: ``python -m msa.bench`` (``--help`` explains every option).

Sections (``--sections``, default all four), one module each:

* ``train`` (``train.py``) one full optimisation step, ``msa.engine.train_step`` itself (both towers,
  MSCMAT, every loss, backward, AdamW), on random inputs, compute only: ms/step, pairs/s, peak memory,
  model FLOPs (``FlopCounterMode``, fwd+bwd) and MFU against the measured matrix-multiply rate of the
  device (bf16 on a GPU, fp32 on the CPU). ``--compile``, ``--channels-last`` and ``--fused-adamw`` set
  the config's ``train.compile/channels_last/fused_adamw``; ``msa.engine.prepare_training`` applies them, as in ``fit``.
* ``mscmat`` (``mscmat.py``) the library MSCMAT forward + backward against a naive pair-by-pair MSCMAT
  kept here (never in the library) as the in-run baseline; the two are first shown to agree (max |diff|
  printed).
* ``eval`` (``evaluate.py``) RSICD-size retrieval evaluation (1,093 images, 5,465 captions): embed each
  image and each caption once in large batches, rank on the device with ``msa.metrics.recall_at_k``;
  plus the library's end-to-end ``embed_split`` (shard reading and decoding included) over a small
  synthetic shard set.
* ``loader`` (``loader.py``) the real ``msa.data.PairBatches`` input pipeline over a synthetic shard set,
  with 0 and 1 loader workers, in pairs/s and pairs per CPU-second ("per core"), uint8 pixels (the library's)
  against the earlier float path kept there as the in-run baseline, to size the CPU count per GPU.

The rest: ``cli.py`` (flags, the runner, the JSON report, the GPU targets), ``timing.py`` (timers,
memory trackers, device facts, the dispatch-mode live-tensor tracker), ``context.py`` (the model,
random inputs and synthetic corpus the sections share), ``common.py`` (constants, reference figures,
table formatting).

GPU timings use CUDA events and ``torch.cuda.max_memory_allocated``. On the CPU, wall-clock timing is
used and memory is the peak of live tensor bytes seen by a dispatch-mode tracker during one extra,
untimed call (CPU PyTorch keeps no allocator statistics); it says so wherever it is printed.
The reference figures (the authors' code, fp32, one H100) are printed for orientation and compared only
with a GPU run; targets are evaluated only on a GPU.

This package imports the model library (``msa.config``, ``model``, ``mscmat``, ``losses``, ``engine``,
``data``, ``encoders``, ``evaluate``, ``metrics``), torch and the standard library, plus ``shards`` to
write the synthetic shard set; never ``msa.runtime``, ``msa.retrieval``, ``flows``, Ray, MLflow or Prefect.
"""

from msa.bench.cli import build_parser, main
from msa.bench.common import SECTIONS
from msa.bench.mscmat import NaivePairMSCMAT

__all__ = ["SECTIONS", "NaivePairMSCMAT", "build_parser", "main"]
