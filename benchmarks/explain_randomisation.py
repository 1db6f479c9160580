"""Model-randomisation sanity check (Adebayo et al. 2018) on a trained vitkit checkpoint.

Prints the mean Spearman rank correlation between each method's maps on the trained model and on
copies whose weights are re-drawn from the top down (cascading): after the head only, after the head
and the upper half of the blocks, and after everything down to the patch embedding.

    python benchmarks/explain_randomisation.py runs/quickstart/checkpoints/best.ckpt ~/.cache/vitkit/shapes
"""

import argparse

from vitkit.data import ImageFolderDataModule
from vitkit.explain import model_randomization_test
from vitkit.weights import model_from_checkpoint

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint", help="a trained vitkit checkpoint (.ckpt) or weights file")
parser.add_argument("folder", help="the image folder it was trained on (64 validation images are explained)")
args = parser.parse_args()
model = model_from_checkpoint(args.checkpoint).eval()
data = ImageFolderDataModule(args.folder, batch_size=64, num_workers=0, pretrained_cfg=model.pretrained_cfg)
data.setup("validate")
images = next(iter(data.val_dataloader()))[0][:64]
print("| method | head randomised | + upper blocks | everything |\n|---|---:|---:|---:|")
for method in ["raw_attention", "rollout", "gradient_rollout", "relevance", "gradient"]:
    rho = model_randomization_test(model, images, method, mode="cascading")
    groups = list(rho)
    picks = [groups[0], groups[len(groups) // 2], groups[-1]]
    print(f"| {method} | " + " | ".join(f"{rho[g].mean():.2f}" for g in picks) + " |")
