"""``python -m inductor_moe``: the main job, see inductor_moe.benchmark.main."""

from .benchmark import main

main()
