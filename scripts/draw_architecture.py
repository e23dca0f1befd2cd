"""Draws docs/architecture.svg: what runs where, from `kubectl apply` to tokens.

Plain SVG from the standard library, so the picture is reproducible anywhere: edit the boxes and arrows below, run

    .venv/bin/python scripts/draw_architecture.py          # rewrite docs/architecture.svg
    .venv/bin/python scripts/draw_architecture.py --check  # exit 1 when the committed file is not this output

(tests/unit/test_architecture_svg.py runs the check.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.svg"
W, H = 1240, 975
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
LINE = 15  # px between text lines
ARROW_COLORS = ("424242", "2e7d32", "757575")

# Fill and stroke per part of the system.
STYLE = {
    "user": ("#f5f5f5", "#616161"),
    "control": ("#e3f2fd", "#1565c0"),
    "operator": ("#e8f5e9", "#2e7d32"),
    "build": ("#fff3e0", "#e65100"),
    "store": ("#f3e5f5", "#6a1b9a"),
    "serving": ("#e0f2f1", "#00695c"),
    "observe": ("#fafafa", "#757575"),
    "step": ("#ffffff", "#9e9e9e"),
}


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def cx(self) -> int:
        return self.x + self.w // 2

    @property
    def cy(self) -> int:
        return self.y + self.h // 2

    @property
    def bottom(self) -> int:
        return self.y + self.h

    @property
    def right(self) -> int:
        return self.x + self.w


def _text(
    x: float, y: float, s: str, size: int = 12, weight: str = "normal", anchor: str = "start", fill: str = "#212121"
) -> str:
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
        f'fill="{fill}">{escape(s)}</text>'
    )


def box(
    b: Box,
    kind: str,
    title: str,
    lines: tuple[str, ...] = (),
    dashed: bool = False,
    rx: int = 8,
    title_below: bool = False,
) -> list[str]:
    """A component; its title on top, or at the bottom where arrows come in from above."""
    fill, stroke = STYLE[kind]
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    out = [
        f'<rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="{rx}" fill="{fill}" stroke="{stroke}" '
        f'stroke-width="1.5"{dash}/>',
        _text(b.x + 10, b.bottom - 10 if title_below else b.y + 20, title, 13, "bold", fill=stroke),
    ]
    out += [_text(b.x + 10, b.y + 20 + LINE * (i + 1) + 2, line, 11) for i, line in enumerate(lines)]
    return out


def step(b: Box, title: str, lines: tuple[str, ...] = ()) -> list[str]:
    """A small box inside a component: one stage of what it does."""
    fill, stroke = STYLE["step"]
    out = [
        f'<rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="5" fill="{fill}" stroke="{stroke}"/>',
        _text(b.cx, b.y + 16, title, 11, "bold", "middle"),
    ]
    out += [_text(b.cx, b.y + 16 + 13 * (i + 1), line, 10, anchor="middle") for i, line in enumerate(lines)]
    return out


def arrow(
    points: list[tuple[int, int]],
    label: str = "",
    at: tuple[int, int] | None = None,
    color: str = "#424242",
    dashed: bool = False,
    both: bool = False,
    anchor: str = "middle",
) -> list[str]:
    """A polyline with an arrowhead at its end (and its start with both); the label at `at`."""
    d = " ".join(f"{x},{y}" for x, y in points)
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    mark = f"url(#head-{color.lstrip('#')})"
    start = f' marker-start="{mark}"' if both else ""
    out = [f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.6"{dash}{start} marker-end="{mark}"/>']
    if label:
        lx, ly = at or ((points[0][0] + points[-1][0]) // 2, (points[0][1] + points[-1][1]) // 2)
        for i, part in enumerate(label.split("\n")):
            out.append(_text(lx, ly + i * 13, part, 10, anchor=anchor, fill=color))
    return out


def draw() -> str:
    parts: list[str] = []
    add = parts.extend
    green, grey = "#2e7d32", "#757575"

    # --- who applies, and the control plane -------------------------------------------------------------------
    user = Box(20, 40, 250, 76)
    add(box(user, "user", "You, or a GitOps controller", ("kubectl apply -f engine.yaml", "(Argo CD / Flux sync)")))
    api = Box(440, 20, 460, 96)
    add(
        box(
            api,
            "control",
            "Kubernetes API server",
            (
                "LLMEngine objects (CRD generated from the pydantic models):",
                "spec in, status out (phase, conditions Ready / Available /",
                "Stalled / EnvelopeExceeded, url, servingEngine)",
            ),
        )
    )
    add(arrow([(user.right, 78), (api.x, 78)], "create / update", (355, 70)))

    # --- the operator -------------------------------------------------------------------------------------------
    op = Box(300, 170, 690, 270)
    add(box(op, "operator", "llmengine-operator (Kopf; one active replica, standbys in a peering)"))
    hook = Box(315, 205, 200, 74)
    add(
        step(
            hook,
            "admission webhook",
            ("plans every create/update;", "refuses a spec that can", "never build (names the field)"),
        )
    )
    traffic = Box(530, 205, 230, 74)
    add(
        step(
            traffic,
            "traffic",
            ("reads each Ready pod's", "/llmengine/metrics: envelope", "exceeded? Auto: raise shapes"),
        )
    )
    metrics = Box(775, 205, 200, 74)
    add(
        step(
            metrics,
            "/metrics :8080",
            ("engines by phase, builds,", "queue depth, store hits", "and errors, reconciles"),
        )
    )
    sw, sy, sh = 155, 340, 80
    xs = [315, 490, 645, 820]
    add(
        step(
            Box(xs[0], sy, sw, sh),
            "plan",
            ("validate, GPU + memory fit,", "engine identity: SHA-256", "of the build config"),
        )
    )
    add(
        step(
            Box(xs[1], sy, sw - 20, sh),
            "store check",
            ("<digest>/manifest.json", "committed? then no", "build (a store hit)"),
        )
    )
    add(
        step(
            Box(xs[2], sy, sw, sh),
            "build queue",
            ("per GPU pool (class +", "MIG profile); at most", "concurrencyPerPool run"),
        )
    )
    add(
        step(
            Box(xs[3], sy, sw, sh),
            "act",
            ("build Job, then Deployment", "+ Service; status through", "the status subresource"),
        )
    )
    for a, b, w_ in zip(xs, xs[1:], (sw, sw - 20, sw), strict=False):
        add(arrow([(a + w_, sy + sh // 2), (b, sy + sh // 2)]))
    # Traffic beyond the envelope, with rebuildPolicy Auto: raised shapes are planned into a new identity.
    add(
        arrow(
            [(traffic.x + 30, traffic.bottom), (traffic.x + 30, 300), (xs[0] + 77, 300), (xs[0] + 77, sy)],
            color=green,
            dashed=True,
        )
    )
    parts.append(_text(xs[0] + 84, 318, "raised shapes: a new identity, a rebuild", 10, fill=green))

    add(
        arrow(
            [(api.x + 60, api.bottom), (api.x + 60, hook.y)],
            "AdmissionReview",
            (api.x + 66, 150),
            anchor="start",
            both=True,
        )
    )
    add(
        arrow(
            [(api.x + 340, api.bottom), (api.x + 340, op.y)],
            "watch engines, Jobs, Deployments;\nwrite status, Events, children",
            (api.x + 346, 138),
            anchor="start",
            both=True,
        )
    )

    # --- the build Job ----------------------------------------------------------------------------------------
    job = Box(20, 500, 600, 160)
    add(
        box(
            job,
            "build",
            "build Job llme-build-<digest 12>-<store 8>  (a GPU node of the target pool)",
        )
    )
    bw, by, bh = 138, 540, 100
    bx = [32, 182, 332, 472]
    add(
        step(
            Box(bx[0], by, bw, bh),
            "fetch",
            ("weights from Hugging", "Face (token by Secret", "reference) or S3;", "calibration text"),
        )
    )
    add(
        step(
            Box(bx[1], by, bw, bh),
            "convert + compile",
            ("checkpoint conversion,", "quantization (ModelOpt),", "TensorRT-LLM build", "for the GPU's SM"),
        )
    )
    add(
        step(
            Box(bx[2], by, bw - 10, bh),
            "verify",
            ("config.json holds", "every setting of the", "identity (shapes, dtype,", "plugins, tp x pp)"),
        )
    )
    add(
        step(
            Box(bx[3], by, bw, bh),
            "upload",
            ("multipart, per-file", "SHA-256, sizes checked;", "build-result.json,", "manifest.json last"),
        )
    )
    for a, b, w_ in zip(bx, bx[1:], (bw, bw, bw - 10), strict=False):
        add(arrow([(a + w_, by + bh // 2), (b, by + bh // 2)]))
    add(
        arrow(
            [(390, op.bottom), (390, job.y)],
            "creates the Job (the build request\nin a ConfigMap); its result comes\nback in the termination message",
            (384, 458),
            anchor="end",
            dashed=True,
        )
    )
    source = Box(20, 720, 250, 70)
    add(
        box(
            source,
            "observe",
            "model source",
            ("Hugging Face Hub, or an S3 URI", "(pinned revision: part of the identity)"),
        )
    )
    add(arrow([(bx[0] + 50, by + bh), (bx[0] + 50, source.y)], "download", (bx[0] + 56, 700), anchor="start"))

    # --- the store --------------------------------------------------------------------------------------------
    store = Box(680, 500, 280, 160)
    add(
        box(
            store,
            "store",
            "S3 engine store (content-addressed)",
            (
                "s3://<bucket>/<prefix>/<digest>/",
                "  config.json, rank0.engine, ...,",
                "  tokenizer files",
                "  build-result.json",
                "  manifest.json: every file's size and",
                "  SHA-256; the single PUT that commits",
            ),
        )
    )
    add(arrow([(job.right - 8, by + bh // 2), (store.x, by + bh // 2)], "commit", (650, by + bh // 2 - 6)))
    add(arrow([(760, op.bottom), (760, store.y)], "committed?", (766, 474), anchor="start", dashed=True))

    # --- serving ----------------------------------------------------------------------------------------------
    dep = Box(300, 720, 690, 240)
    add(
        box(
            dep,
            "serving",
            "serving Deployment llme-<name>  (GPU nodes of the pool; rolling, maxUnavailable 0)",
            title_below=True,
        )
    )
    init = Box(315, 740, 205, 110)
    add(
        step(
            init,
            "init: fetch-engine",
            (
                "serve-engine download:",
                "manifest first, parallel",
                "ranged GETs, every file's",
                "SHA-256 checked before it",
                "is renamed into place",
            ),
        )
    )
    server = Box(540, 740, 435, 190)
    add(box(server, "step", "server container", rx=5))
    pre = Box(555, 775, 125, 70)
    add(step(pre, "GPU preflight", ("count, SM, free", "memory, MIG vs", "the manifest")))
    proxy = Box(700, 775, 120, 70)
    add(step(proxy, "metering proxy", (":8000 (public)", "/llmengine/", "metrics")))
    trt = Box(840, 775, 120, 70)
    add(step(trt, "trtllm-serve", ("127.0.0.1:8001", "OpenAI API on", "the engine")))
    add(arrow([(pre.right, pre.cy), (proxy.x, proxy.cy)]))
    add(arrow([(proxy.right, proxy.cy), (trt.x, trt.cy)]))
    for i, line in enumerate(
        (
            "serve-engine run: preflight, then the proxy on the public port and trtllm-serve on",
            "loopback. Probes hit /health through the proxy; it counts completion requests",
            "(prompt and output tokens, concurrency, refusals) and relays everything, streams",
            "included. The old engine's pods serve until the new one is committed and Ready.",
        )
    ):
        parts.append(_text(555, 880 + 13 * i, line, 10))
    add(arrow([(init.right, init.cy), (server.x, init.cy)]))
    add(
        arrow(
            [(720, store.bottom), (720, 690), (init.cx, 690), (init.cx, init.y)],
            "download + verify",
            (init.cx + 6, 684),
            anchor="start",
        )
    )
    add(
        arrow(
            [(975, op.bottom), (975, dep.y)],
            "creates when the\nengine is committed\n(and its benchmark\ngate passed)",
            (981, 470),
            anchor="start",
            dashed=True,
        )
    )
    # The operator reads the serving pods' metrics itself (not through Prometheus).
    add(
        arrow(
            [(proxy.cx - 15, proxy.y), (proxy.cx - 15, 705), (640, 705), (640, traffic.bottom)],
            color=green,
            dashed=True,
        )
    )
    parts.append(_text(634, 456, "traffic profile", 10, anchor="end", fill=green))
    parts.append(_text(634, 469, "(each pass of a", 10, anchor="end", fill=green))
    parts.append(_text(634, 482, "Ready engine)", 10, anchor="end", fill=green))

    # --- Service, clients, monitoring ---------------------------------------------------------------------------
    svc = Box(1020, 790, 200, 56)
    add(box(svc, "control", "Service llme-<name>", (":8000 = status.url",)))
    clients = Box(1020, 890, 200, 56)
    add(box(clients, "user", "clients", ("/v1/chat/completions: tokens",)))
    add(arrow([(svc.x, 860), (proxy.cx + 20, 860), (proxy.cx + 20, proxy.bottom)]))
    add(arrow([(clients.cx, clients.y), (clients.cx, svc.bottom)], "requests", (clients.cx + 6, 872), anchor="start"))

    prom = Box(1020, 170, 200, 250)
    add(
        box(
            prom,
            "observe",
            "Prometheus + Grafana",
            (
                "(chart values, opt-in)",
                "ServiceMonitor: operator",
                "PodMonitor: serving pods,",
                "  labels engine, engine_digest",
                "PrometheusRule: page on",
                "  Available=False and",
                "  Stalled, never on Ready",
                "dashboard ConfigMap",
                '  (grafana_dashboard: "1")',
                "",
                "docs/metrics.md",
            ),
            dashed=True,
        )
    )
    add(arrow([(prom.x, metrics.cy), (metrics.right, metrics.cy)], "scrape", (998, metrics.cy - 6), color=grey))
    add(
        arrow(
            [(proxy.cx + 15, proxy.y), (proxy.cx + 15, 705), (1120, 705), (1120, prom.bottom)],
            "scrape",
            (1126, 600),
            color=grey,
            anchor="start",
        )
    )

    heads = "".join(
        f'<marker id="head-{c}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#{c}"/></marker>'
        for c in ARROW_COLORS
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="{FONT}">',
            "<title>llmengine-operator: what runs where, from kubectl apply to tokens</title>",
            f"<defs>{heads}</defs>",
            f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
            *parts,
            "</svg>",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = ap.parse_args(argv)
    svg = draw()
    if args.check:
        if OUT.read_text() != svg:
            print(f"{OUT} is not what {Path(__file__).name} draws: run it and commit the result", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
