"""``ctxai bench``: how fast and how lean the engine explains, measured against the plain cost of the model passes
each method needs and against Captum and MONAI used as their documentation shows (GitHub issue "Performance").

Cases, on the bundled models and a synthetic part (seed :data:`BENCH_SEED`, which training and evaluation never use):

1. the classifier on its 32³ patch centred on the largest pore, target "pore": :data:`CLASSIFIER_METHODS`;
2. occlusion (:data:`OCCLUSION`) of the classifier on a 48³ patch, which a copy of its card makes one tile, by each
   of the engine's occlusion engines (:data:`OCCLUSION_ENGINES`);
3. the U-Net over whole parts of 128³ and 256³ voxels through the engine's sliding window, target "void" summed
   over the whole volume: :data:`UNET_METHODS_CPU` on a CPU (one 64³ forward and backward takes about a second
   there, and 256³ has 125 tiles), :data:`UNET_METHODS_CUDA` on a GPU;
4. :data:`LOADED` (IG-32 on the classifier) again, timed while :data:`LOAD_PROCESSES` busy processes started and
   stopped by the benchmark compete for the CPU (row ``...-loaded``);
5. memory only (``memory-roi128``, ``memory-roi512``, ``memory-whole128``, ``memory-whole256``): the U-Net's peak
   memory on a large part beyond its working set, for one voxel and for the whole part (:data:`MEMORY_SCENARIOS`);
6. only when named (``--cases nnunet-cam``): CTXAI's Grad-CAM against nnunetv2-cam's on a tiny nnU-Net, in the
   reference's own environment (:mod:`.nnunet_cam`).

Every case runs in two child processes (``python -m CTXAILib.bench --child ...``) so that a peak of memory belongs
to one thing. The *memory* child runs the engine once in a fresh process: its peak resident set is the engine's, its
time the cold first run. The *timing* child warms up, then times, repeat by repeat and in this order, the engine,
the limit, Captum and MONAI, so that the slow drifts of a shared machine hit them alike.

The *limit* of a run is the plain cost of the model passes it needs: the registry's estimate of model evaluations
times the tiles times the raw network's time per sample (forward, and backward from the target logit with the input
requiring its gradient; forward only for perturbation methods and the prediction), at the batch size of
:data:`BATCHES` that is fastest per sample.

The JSON report holds the machine, every setting, every time and peak; its ``criteria`` section checks the issue's
targets against the measured numbers, unadjusted.

The package keeps the cases apart from how they are measured and reported: :mod:`.cases` (what runs),
:mod:`.measure` (times, peaks, the limit), :mod:`.references` (Captum and MONAI), :mod:`.children` (the two child
processes) and :mod:`.run` (the run, its report and table). ``ctxai bench`` is :mod:`CTXAILib.commands.bench`.
Nothing here imports torch until a benchmark runs.
"""

from __future__ import annotations

from .cases import (BATCHES, BENCH_SEED, CLASSIFIER_METHODS, OCCLUSION, OCCLUSION_ENGINES, UNET_METHODS_CPU,
                    UNET_METHODS_CUDA, Case, plan_cases)
from .run import format_table, run_bench

__all__ = ["BENCH_SEED", "CLASSIFIER_METHODS", "UNET_METHODS_CPU", "UNET_METHODS_CUDA", "OCCLUSION",
           "OCCLUSION_ENGINES", "BATCHES", "Case", "plan_cases", "run_bench", "format_table"]
