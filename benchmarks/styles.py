"""Every supported MoE block style: eager vs torch.compile vs torch.compile + inductor_moe.

    python benchmarks/styles.py --json benchmarks/results/cpu_styles_bf16.json
    python benchmarks/styles.py --backward --json benchmarks/results/cpu_styles_bf16_train.json
    python benchmarks/styles.py --styles families torchtitan --json benchmarks/results/cpu_families_bf16.json

The built-in styles; ``families`` stands for every transformers family's MoE block with each
experts implementation, ``torchtitan`` for torchtitan's MoE layer. Defaults: T=512, H=512, I=256, E=16, k=4 in bfloat16.
"""

from inductor_moe import benchmark, models

STYLES = [*models.STYLES, "transformers_grouped_mm", "transformers_batched_mm"]
FAMILIES = [f"{family}_{impl}" for family in models.FAMILIES for impl in ("grouped_mm", "batched_mm", "eager")]

if __name__ == "__main__":
    parser = benchmark.parser(__doc__.splitlines()[0])
    parser.add_argument("--styles", nargs="+", default=STYLES)
    args = parser.parse_args()
    benchmark.run([name for style in args.styles for name in (FAMILIES if style == "families" else [style])], args)
