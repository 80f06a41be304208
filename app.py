"""dense — the web app. A thin layer of Gradio UI over the `dense` package.

    python app.py                      # http://127.0.0.1:7860, bundled weights, no network
    python app.py --host 0.0.0.0 --port 8080

Each tab lives in ``dense/ui/<tab>.py`` (its layout in ``build()``, its work in plain functions
that tests call without a browser); models load lazily, once, and are shared by all requests.
"""

from __future__ import annotations

import argparse
import os
import threading

import gradio as gr

from dense.ui import common, lab, models, pose, restore, segment

TABS = (("Segment", segment), ("Pose", pose), ("Restore", restore), ("Upsampling lab", lab),
        ("Models", models))


def build_app() -> gr.Blocks:
    # delete_cache: Gradio keeps a copy of every upload and result; drop those older than an
    # hour, checking every 10 minutes, so a long-running demo's disk use stays bounded.
    with gr.Blocks(title="dense — dense prediction with U-Nets",
                   delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# dense\nPredict something for every pixel: segmentation, pose, restoration, and "
            "the upsampling methods compared. All models run on this machine "
            f"({common.device_label()})."
        )
        for title, module in TABS:
            with gr.Tab(title):
                module.build()
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Start the dense web app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--max-file-size", default=os.environ.get("DENSE_MAX_UPLOAD", "50mb"),
                        help="largest upload accepted (default 50mb)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app()
    demo.queue(max_size=common.QUEUE_SIZE, default_concurrency_limit=common.CONCURRENCY)
    threading.Thread(target=common.warm_up, name="warm-up", daemon=True).start()
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        allowed_paths=[str(common.EXAMPLES_DIR)],  # examples only; outputs are Gradio's cache
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
