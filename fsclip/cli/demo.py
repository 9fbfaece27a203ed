"""`fsclip demo`: an offline end-to-end run on the bundled shapes-world model."""

from __future__ import annotations

from pathlib import Path

MARKER = ".fsclip-demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: zero-shot on generated shape images",
                       description="Write shape images, classify them from text labels with the bundled "
                                   "shapes-world CLIP, print the predictions and the accuracy. No network needed.")
    p.add_argument("--out", type=Path, default=Path("fsclip-demo"), help="folder for the images (default: ./fsclip-demo)")
    p.add_argument("--per-combo", type=int, default=1, help="images per colour x shape combination (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from fsclip._io import atomic_dir
    from fsclip._outputs import check_output
    from fsclip.backends import load_model
    from fsclip.predict import predict_records
    from fsclip.shapes import heldout_combos, seen_combos, write_folder
    from fsclip.zeroshot import ZeroShotClassifier

    held = heldout_combos()
    combos = seen_combos()[:: max(1, len(seen_combos()) // 8)][:8] + held
    classes = {f"{c} {s}": [(c, s)] for c, s in combos}
    # the demo replaces its own folder on every run, and nothing else
    check_output(args.out, "--out", lambda p: (p / MARKER).is_file(), overwrite=True, writer="fsclip demo")
    with atomic_dir(args.out, overwrite=True) as tmp:
        write_folder(tmp, classes, args.per_combo, seed=args.seed)
        (tmp / MARKER).write_text("written by fsclip demo; safe to delete\n")
    paths = sorted(args.out.rglob("*.png"))
    labels = sorted({f"{c} {s}" for c, s in seen_combos() + held})

    print(f"Wrote {len(paths)} images to {args.out}/ (one folder per true label).")
    print(f"Classifying them into {len(labels)} labels ('red circle', 'blue star', ...) with the bundled "
          "shapes-world CLIP, from the label text alone.\n")
    backend = load_model("shapes", device="cpu")
    clf = ZeroShotClassifier(backend, labels, "shapes")
    right = {"seen": [0, 0], "unseen": [0, 0]}
    print(f"{'image':<34} {'true label':<16} {'predicted':<16} {'score':>6}  combination")
    for rec in predict_records(backend, paths, clf.predict_proba, labels, top_k=1, progress=False):
        truth = Path(rec["path"]).parent.name.replace("_", " ")
        kind = "unseen" if tuple(truth.split()) in held else "seen"
        if "error" in rec:
            print(f"{rec['path']:<34} {truth:<16} ERROR: {rec['error']}")
            continue
        right[kind][0] += rec["label"] == truth
        right[kind][1] += 1
        mark = "" if rec["label"] == truth else "  <- wrong"
        print(f"{rec['path']:<34} {truth:<16} {rec['label']:<16} {rec['predictions'][0]['score']:>6.2f}  {kind}{mark}")
    print()
    for kind, (ok, n) in right.items():
        what = "pairs seen in training" if kind == "seen" else "colour and shape never named together in training"
        print(f"accuracy on {kind:<6} combinations: {ok}/{n} = {ok / max(n, 1):.2f}   ({what})")
    print(f"chance level: {1 / len(labels):.2f}\n")
    print("Same on your own photos, with a real model (downloaded once, then cached):")
    print('  fsclip classify ~/Pictures --labels "cat,dog,bird" --model ViT-B-32@laion2b_s34b_b79k')
    print('  fsclip classify ~/Pictures --labels "cat,dog,bird" --model openai/clip-vit-base-patch32 --format json')
    return 0
