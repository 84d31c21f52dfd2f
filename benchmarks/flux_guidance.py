"""Does FLUX.1-dev's guidance embedding steer the DMD gradient as classifier-free guidance does?

    python benchmarks/flux_guidance.py              # ~5 min on 2 CPU cores
    python benchmarks/flux_guidance.py --quick      # smoke run (tests): a few steps, written to --out

FLUX.1-dev has no CFG: it was guidance-distilled, one pass at ``guidance = w`` standing in for the
two-pass ``uncond + w (cond - uncond)``. ``FluxTeacher(guidance="embedded")`` therefore computes the
real score of DMD / ADM in one pass with the embedding at ``w``. Whether that steers the method's
gradient as CFG would cannot be measured on FLUX.1-dev on a CPU, so this script builds the same
situation small, where CFG is EXACT:

1. the teacher is the exact class-conditional Gaussian mixture of the mixture testbed
   (:class:`~dmdx_lightning.teachers.mixture.GaussianMixture`; its null label is the unconditional
   mixture), so ``x0_cfg(w) = x0_u + w (x0_c - x0_u)`` is known in closed form;
2. a tiny ``FluxTransformer2DModel`` (the diffusers class FLUX.1 uses, with ``guidance_embeds``;
   latents packed into 2x2 patches, class as text token and pooled vector) is guidance-distilled:
   trained by flow matching to output, at ``guidance = w ~ U(1, 6)``, the velocity of the exact CFG
   prediction at ``w``; the null label (10% of rows) is trained on the unconditional prediction, so
   the same network can also run true CFG;
3. at noised samples ``x_t`` (of the conditional mixture, where a teacher-initialised student
   starts; and of the exact CFG-guided distribution at ``w``, where a trained student ends), the DMD
   direction's guidance term, ``real(w) - real(1)`` (the real minus fake score with the fake score
   at the unguided prediction, as at the start of DMD on a CFG teacher), is compared between

   - **embedded**: the distilled net at ``guidance = w`` minus at ``guidance = 1`` (one pass);
   - **true CFG on the net**: ``(w - 1) (net(c) - net(null))``, both at ``guidance = 1`` (two passes);
   - **exact**: ``(w - 1) (x0_c - x0_u)`` of the mixture.

   Reported per ``t`` and ``w``: the per-sample cosine to the exact direction (mean), and the
   relative error ``||d - d_exact|| / ||d_exact||``. The network's fit (``x0`` error at ``w = 1``)
   is the floor both share.

What it shows and does not: whether guidance distillation, as FLUX.1-dev's, makes the embedded pass
point the DMD gradient where CFG points, on a testbed whose CFG is exact and whose distilled network
is the FLUX architecture; not FLUX.1-dev's own accuracy (its distillation is unpublished and its
data are images), not a trained student's quality.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, machine, markdown_table, set_threads, write_json  # noqa: E402
from dmdx_lightning.teachers.flux import latent_image_ids, pack_latents, unpack_latents  # noqa: E402
from dmdx_lightning.teachers.mixture import GaussianMixture  # noqa: E402


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


COMMAND = "python benchmarks/flux_guidance.py"
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
SCALES = (2.0, 3.5, 5.0)
#: rows whose exact direction is shorter than this have no guidance to follow (x_t already tells the
#: class, so x0_c = x0_u): their cosines are noise and they are left out of the summary
MIN_NORM = 0.1
W_MAX = 6.0


def build_net(num_classes: int, channels: int, width: int, heads: int, layers: int, seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=layers, num_single_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=num_classes + 1,
        pooled_projection_dim=num_classes + 1, guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))


def velocity(net, x_t, t, labels, guidance, num_classes):
    """The net's flow prediction, called as ``FluxTeacher.model_output`` calls FLUX.1's transformer."""
    h, w = x_t.shape[-2:]
    onehot = F.one_hot(labels, num_classes + 1).float()
    out = net(hidden_states=pack_latents(x_t), timestep=t, guidance=guidance, pooled_projections=onehot,
              encoder_hidden_states=onehot[:, None], txt_ids=torch.zeros(1, 3), img_ids=latent_image_ids(h, w),
              return_dict=False)[0]
    return unpack_latents(out, h, w)


def exact_x0(mixture, x_t, t, labels, w):
    """The exact CFG prediction at ``w`` (``w = 1``: the conditional posterior mean)."""
    null = torch.full_like(labels, mixture.num_classes)
    x0_c = mixture.posterior_mean(x_t, t, labels)
    return x0_c if w is None else mixture.posterior_mean(x_t, t, null) + w[:, None, None, None] * (
        x0_c - mixture.posterior_mean(x_t, t, null))


def train(net, mixture, steps: int, batch: int, lr: float, seed: int, log_every: int) -> list[dict]:
    """Guidance distillation by flow matching on the exact CFG target (v = (x_t - x0_cfg) / t)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    warm = max(steps // 20, 1)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    K, log = mixture.num_classes, []
    for step in range(steps):
        labels = torch.randint(K, (batch,), generator=g)
        x0, _ = mixture.sample(labels, generator=g)
        drop = torch.rand(batch, generator=g) < 0.1
        labels = torch.where(drop, torch.full_like(labels, K), labels)  # the null label: the unconditional mixture
        t = 0.02 + 0.98 * torch.rand(batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        w = 1.0 + (W_MAX - 1.0) * torch.rand(batch, generator=g)
        with torch.no_grad():
            target_x0 = exact_x0(mixture, x_t, t, labels, w)  # the null label's CFG is itself for any w
            target = (x_t - target_x0) / t[:, None, None, None]
        loss = F.mse_loss(velocity(net, x_t, t, labels, w, K), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item()})
    return log


@torch.no_grad()
def guided_samples(mixture, labels, w: float, steps: int, generator) -> torch.Tensor:
    """Samples of the exact CFG-guided distribution at ``w`` (Euler on the exact guided velocity)."""
    x = torch.randn(len(labels), *mixture.shape, generator=generator)
    grid = torch.linspace(1.0, 0.0, steps + 1)
    ws = torch.full((len(labels),), w)
    for t, s in zip(grid[:-1], grid[1:]):
        tt = torch.full((len(labels),), float(t))
        x0 = exact_x0(mixture, x, tt, labels, ws)
        eps = (x - (1 - t) * x0) / t
        x = (1 - s) * x0 + s * eps
    return x


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def _rel(a, b):
    """``||a - b|| / ||b||`` over the whole batch (per sample it explodes where ``b`` nearly vanishes)."""
    return (a - b).norm() / b.norm().clamp_min(1e-12)


@torch.no_grad()
def evaluate(net, mixture, n: int, seed: int, sample_steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 1)
    K, rows = mixture.num_classes, []
    labels = torch.arange(n) % K
    null = torch.full_like(labels, K)
    starts = {"conditional": mixture.sample(labels, generator=g)[0]}
    for w in SCALES:
        starts[f"guided w={w:g}"] = guided_samples(mixture, labels, w, sample_steps, g)
    for where, x0 in starts.items():
        for t_ in TIMES:
            t = torch.full((n,), t_)
            x_t = (1 - t_) * x0 + t_ * torch.randn(x0.shape, generator=g)

            def net_x0(lab, guidance):
                return x_t - t_ * velocity(net, x_t, t, lab, torch.full((n,), guidance), K)

            x0_c, x0_u = mixture.posterior_mean(x_t, t, labels), mixture.posterior_mean(x_t, t, null)
            net_c, net_u = net_x0(labels, 1.0), net_x0(null, 1.0)
            fit = _rel(net_c, x0_c).item()
            for w in SCALES:
                if where.startswith("guided") and where != f"guided w={w:g}":
                    continue
                exact = (w - 1) * (x0_c - x0_u)
                embedded = net_x0(labels, w) - net_c
                true_cfg = (w - 1) * (net_c - net_u)
                rows.append({
                    "x_t of": where, "t": t_, "w": w, "fit_rel_err": fit,
                    "cos_embedded": _cos(embedded, exact).mean().item(), "cos_true_cfg": _cos(true_cfg, exact).mean().item(),
                    "cos_embedded_vs_true_cfg": _cos(embedded, true_cfg).mean().item(),
                    "rel_err_embedded": _rel(embedded, exact).item(), "rel_err_true_cfg": _rel(true_cfg, exact).item(),
                    "exact_norm": exact.flatten(1).norm(dim=1).mean().item()})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="double-stream blocks, and as many single-stream blocks")
    parser.add_argument("--std", type=float, default=0.3, help="every mode's standard deviation")
    parser.add_argument("--mean_scale", type=float, default=0.1, help="the modes' means are N(0, mean_scale^2 I)")
    parser.add_argument("--eval_samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 32 samples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_samples = 20, 32
    threads = set_threads(args.threads)
    mixture = GaussianMixture(shape=(16, 4, 4), num_classes=4, modes_per_class=4, std=args.std, seed=args.seed)
    # means drawn N(0, I) in d = 256 dimensions are so far apart that x_t tells the class at any t < 0.9
    # and CFG changes nothing; shrunk, the classes overlap at moderate noise, where guidance acts
    mixture.means.mul_(args.mean_scale)
    net = build_net(mixture.num_classes, 16, args.width, args.heads, args.layers, args.seed)
    start = time.time()
    log = train(net, mixture, args.steps, args.batch, args.lr, args.seed, max(args.steps // 20, 1))
    train_s = time.time() - start
    rows = evaluate(net.eval(), mixture, args.eval_samples, args.seed, sample_steps=32)
    report = {"command": COMMAND + (" " + " ".join(argv) if argv else ""), "machine": machine(threads),
              # paths as given, relative to the checkout where they lie in it (no machine's path in results)
              "settings": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "mixture": {"shape": list(mixture.shape), "num_classes": mixture.num_classes,
                          "modes_per_class": mixture.modes_per_class, "std": mixture.std,
                          "mean_scale": args.mean_scale},
              "params": sum(p.numel() for p in net.parameters()), "train_seconds": round(train_s, 1),
              "train_log": log, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "flux_guidance.json", report)
    (args.out / "flux_guidance.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    rows = report["rows"]
    s = report["settings"]
    lines = [
        "# FLUX guidance: the DMD direction under the guidance embedding vs true CFG (tiny, exact testbed)", "",
        f"Command: `{report['command']}` ({report['machine']['date_utc']} UTC, torch {report['machine']['torch']}, "
        f"{report['machine']['torch_threads']} thread(s), CPU). Raw numbers: `flux_guidance.json`.", "",
        f"A {report['params'] / 1e6:.2f}M-parameter `FluxTransformer2DModel` ({s['layers']} double + {s['layers']} "
        f"single blocks, width {s['width']}, guidance embedding) guidance-distilled for {s['steps']} steps "
        f"(batch {s['batch']}, {report['train_seconds']:.0f} s) on the exact Gaussian mixture "
        f"{report['mixture']['num_classes']} classes x {report['mixture']['modes_per_class']} modes, latents "
        f"{tuple(report['mixture']['shape'])}, std {report['mixture']['std']}, means N(0, "
        f"{report['mixture']['mean_scale']}^2 I) (guidance w ~ U(1, {W_MAX:g}); the null "
        "label 10% of rows). Final training loss (velocity MSE): "
        f"{report['train_log'][-1]['loss']:.4f} (first logged {report['train_log'][0]['loss']:.4f}).", "",
        "Directions compared at the same noised samples (the DMD direction's guidance term, `real(w) - real(1)`):",
        "**embedded** = net(guidance w) - net(guidance 1), one pass; **true CFG** = (w - 1)(net(c) - net(null)) "
        "on the same net, two passes; **exact** = (w - 1)(x0_c - x0_u) of the mixture. `cos`: mean per-sample "
        "cosine to the exact direction; `rel. err`: ||d - exact|| / ||exact|| over the batch; `fit`: the net's "
        "relative x0 error at w = 1, ||net(c) - x0_c|| / ||x0_c|| (the floor both share); `|exact|`: the mean "
        "per-sample norm of the exact direction.", "",
    ]
    def cells(r):
        if r["exact_norm"] < MIN_NORM:  # no guidance to follow: cosines and relative errors are noise
            return [f"{r['t']:g}", f"{r['w']:g}", "-", "-", "-", "-", "-", f"{r['fit_rel_err']:.3f}", f"{r['exact_norm']:.2f}"]
        return [f"{r['t']:g}", f"{r['w']:g}", f"{r['cos_embedded']:.3f}", f"{r['cos_true_cfg']:.3f}",
                f"{r['cos_embedded_vs_true_cfg']:.3f}", f"{r['rel_err_embedded']:.3f}", f"{r['rel_err_true_cfg']:.3f}",
                f"{r['fit_rel_err']:.3f}", f"{r['exact_norm']:.2f}"]

    for where in dict.fromkeys(r["x_t of"] for r in rows):
        lines += [f"## x_t from {where} samples", "",
                  markdown_table(["t", "w", "cos embedded", "cos true CFG", "cos embedded vs true CFG",
                                  "rel. err embedded", "rel. err true CFG", "fit", "|exact|"],
                                 [cells(r) for r in rows if r["x_t of"] == where]), ""]
    kept = [r for r in rows if r["exact_norm"] >= MIN_NORM]
    lines += ["## Summary", ""]
    if kept:
        emb, cfg = [r["cos_embedded"] for r in kept], [r["cos_true_cfg"] for r in kept]
        err_e, err_c = [r["rel_err_embedded"] for r in kept], [r["rel_err_true_cfg"] for r in kept]
        lines += [f"Over the {len(kept)} rows with a guidance direction (|exact| >= {MIN_NORM}; '-' rows: x_t already "
                  "tells the class, CFG changes nothing): mean cosine to the exact CFG direction, embedded "
                  f"{sum(emb) / len(emb):.3f} (min {min(emb):.3f}), true CFG on the same net {sum(cfg) / len(cfg):.3f} "
                  f"(min {min(cfg):.3f}); mean relative error embedded {sum(err_e) / len(err_e):.3f}, true CFG "
                  f"{sum(err_c) / len(err_c):.3f}.", ""]
    lines += ["What this shows: whether a guidance-distilled network of FLUX.1's architecture, given `w` as its "
              "guidance input, moves the DMD gradient where classifier-free guidance at `w` would, on a testbed "
              "whose CFG is exact; true CFG on the same network is the two-pass alternative "
              "(`FluxTeacher(guidance=\"true_cfg\")`). What it does not show: FLUX.1-dev's own accuracy (its "
              "guidance distillation and data are unpublished; this net was distilled from an exact target), "
              "images, or a trained student's quality.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
