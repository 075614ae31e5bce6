"""Before/after check that #38's feeding changes cost nothing on a CPU: the loader's images/s over one
shuffled, augmented epoch of generated JPEGs (its default threads), and a 2-epoch small_cnn
`kbench.training.train` (epoch seconds, the whole call's wall seconds, the validation log loss). Run it with
PYTHONPATH at each tree to compare; prints one JSON line.

    PYTHONPATH=. python benchmarks/feed_cpu.py --images 2048 --image-size 96
    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/feed_cpu.py --images 1024 --epochs 3   # the async A/B
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from kbench.core.backend import use_backend

    use_backend()
    from kbench.data.dataset import find_images
    from kbench.data.loader import ImageLoader
    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.training.config import TrainConfig
    from kbench.training.train import train

    with tempfile.TemporaryDirectory() as folder:
        data = write_kaggle_dataset(folder, n_train=args.images, n_test=2, image_size=160, seed=3)
        images = find_images(data["train"])
        loader = ImageLoader(
            images, np.arange(len(images.keys)), args.image_size, args.batch_size, augment=True, shuffle=True
        )
        for batch in range(2):
            loader.batch(0, batch)  # pool started, zip open
        start = time.perf_counter()
        for batch in range(len(loader)):
            loader.batch(1, batch)
        loader_rate = len(images.keys) / (time.perf_counter() - start)
        loader.close()
        config = TrainConfig(
            backbone="small_cnn",
            data=data["train"],
            run_dir=os.path.join(folder, "run"),
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            val_split=0.1,
            seed=0,
        )
        from kbench.training.runs import Run

        start = time.perf_counter()
        result = train(config, verbose=0)
        train_seconds = time.perf_counter() - start
        epochs = [row["epoch_seconds"] for row in Run(config.run_dir).history]
    print(
        json.dumps(
            {
                "tree": sys.path[0] if False else os.environ.get("PYTHONPATH"),
                "loader_images_per_second": round(loader_rate, 1),
                "epoch_seconds": [round(e, 2) for e in epochs],
                "train_wall_seconds": round(train_seconds, 2),
                "val_log_loss": round(result["val_log_loss"], 6),
                "workers": loader.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
