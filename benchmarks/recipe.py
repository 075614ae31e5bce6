"""The reference study's fine-tuning recipe against today's, on the demo's generated data.

    python benchmarks/recipe.py [--images 600] [--image-size 64] [--out benchmarks/results/recipe/recipe.json]

Each case trains one backbone twice with the same seed, split, peak learning rate and epoch budget:

- ``seed``: the reference study's recipe: every layer (batch norm included) trains from the first
  step, constant Adam, a fixed number of epochs, the last epoch's weights kept;
- ``new``: linear warm-up for one epoch then cosine decay to 0, AdamW (weight decay 0.05, as timm fine-tunes), early
  stopping (patience 2, the best epoch's weights kept); from pretrained weights also one head epoch
  and batch norm in inference mode; from random weights batch-norm momentum 0.9;
- from random weights also ``seed + bn momentum 0.9`` (the seed's recipe with only that change) and
  ``new, no early stopping``.

Cases: small_cnn from random weights; small_cnn "pretrained" (trained first on another generated set
with another seed: real backbones have no ImageNet weights offline); mobilenet_v2 from random weights
at a reduced size. Writes the rows as JSON and prints a markdown table (validation log loss and
accuracy of the kept weights, epochs run, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.record import positive_int  # noqa: E402

NEW_RANDOM = dict(schedule="cosine", warmup_epochs=1, weight_decay=0.05, early_stopping=2, bn_momentum=0.9)
NEW_PRETRAINED = dict(schedule="cosine", warmup_epochs=1, weight_decay=0.05, early_stopping=2, head_epochs=1)
# (name, backbone, weights, epochs, lr)
CASES = [
    ("small_cnn, random init", "small_cnn", "none", 8, 2e-3),
    ("small_cnn, pretrained on other data", "small_cnn", "pretrained", 6, 1e-3),
    ("mobilenet_v2, random init", "mobilenet_v2", "none", 5, 1e-3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive_int, default=600)
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "recipe", "recipe.json"))
    args = parser.parse_args()

    import keras

    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.training.config import TrainConfig
    from kbench.training.train import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="kbench-recipe-") as scratch:
        data = write_kaggle_dataset(
            os.path.join(scratch, "data"), n_train=args.images, n_test=1, image_size=args.image_size
        )["train"]
        other = write_kaggle_dataset(
            os.path.join(scratch, "other"), n_train=args.images, n_test=1, image_size=args.image_size, seed=7
        )["train"]

        def run(name, backbone, data_path, weights, epochs, lr, **recipe):
            config = TrainConfig(
                backbone=backbone,
                data=data_path,
                run_dir=os.path.join(scratch, name),
                epochs=epochs,
                batch_size=32,
                image_size=args.image_size,
                lr=lr,
                weights=weights,
                val_split=0.15,
                seed=0,
                **recipe,
            )
            start = time.perf_counter()
            result = train(config, verbose=0)
            return result, time.perf_counter() - start

        pretrained = None
        for index in (int(i) for i in args.cases.split(",")):
            case, backbone, weights, epochs, lr = CASES[index]
            if weights == "pretrained":
                if pretrained is None:
                    run("pretraining", "small_cnn", other, "none", 4, 2e-3, bn_momentum=0.9)
                    pretrained = os.path.join(scratch, "pretraining", "model.keras")
                weights = pretrained
            recipes = [("seed", dict(train_bn=True))]
            if weights == "none":  # which part of the new recipe does it: batch-norm momentum alone
                recipes.append(("seed + bn momentum 0.9", dict(bn_momentum=0.9)))
            recipes.append(("new", NEW_RANDOM if weights == "none" else NEW_PRETRAINED))
            if weights == "none":  # from random weights the validation loss sits at chance for a while
                recipes.append(("new, no early stopping", {**NEW_RANDOM, "early_stopping": 0}))
            for recipe, options in recipes:
                result, seconds = run(
                    f"{index}-{recipe.replace(' ', '_')}", backbone, data, weights, epochs, lr, **options
                )
                rows.append(
                    {
                        "case": case,
                        "backbone": backbone,
                        "recipe": recipe,
                        "image_size": args.image_size,
                        "train_images": result["train_images"],
                        "val_images": result["val_images"],
                        "epochs_budget": epochs,
                        "epochs_run": result["epochs_trained"],
                        "model_epoch": result["model_epoch"],
                        "lr": lr,
                        "settings": result["recipe"],
                        "val_log_loss": result["val_log_loss"],
                        "val_accuracy": result["val_accuracy"],
                        "wall_seconds": round(seconds, 1),
                    }
                )
                print(
                    f"{case} / {recipe}: log loss {result['val_log_loss']:.4f}, "
                    f"accuracy {result['val_accuracy']:.3f}, {seconds:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "images": args.images,
        "image_size": args.image_size,
        "rows": rows,
    }
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2)
    print("| case | recipe | val log loss | val accuracy | epochs run (kept) | wall s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['recipe']} | {row['val_log_loss']:.4f} | {row['val_accuracy']:.3f} | "
            f"{row['epochs_run']} of {row['epochs_budget']} ({row['model_epoch']}) | {row['wall_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
