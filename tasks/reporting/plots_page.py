"""The page `dvc plots show` renders into, with Vega inlined, so the plots draw on a machine with no internet.

    python -m tasks.reporting.plots_page              # writes .dvc/plots.html (`make install` runs it)

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN: offline it is a blank page. ``.dvc/config`` names
this page as DVC's HTML template (``plots.html_template = plots.html``); DVC fills ``{plot_divs}`` with one
``vegaEmbed(...)`` call per plot. The scripts come from the installed ``vl-convert-python`` package (its bundle of
vega-embed, Vega-Lite and Vega, which puts ``vegaEmbed`` on ``window``), so the page is generated here rather than
committed: it is about 0.9 MB of third-party code, and it follows the installed version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path(".dvc/plots.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>medpipe: DVC plots</title>
    <!-- vega-embed, Vega-Lite and Vega {version}, inlined from vl-convert-python: no network needed -->
    <script>
{bundle}
    </script>
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def page() -> str:
    """The HTML template: DVC's placeholders ``{plot_divs}`` and ``{refresh_tag}``, the Vega scripts inline."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    # DVC substitutes its placeholders with str.replace: the inlined code must not contain one, nor end the script
    for marker in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
        if marker in bundle:
            raise RuntimeError(f"the vl-convert bundle contains {marker!r}: it cannot be inlined in DVC's template")
    return PAGE.format(bundle=bundle, version=f"(vl-convert {vl_convert.__version__})")


def write_page(output: Path = DEFAULT_OUTPUT) -> Path:
    """Write the template to ``output`` (only when its content changed); returns the path."""
    text = page()
    if not output.exists() or output.read_text(encoding="utf-8") != text:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m tasks.reporting.plots_page", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                    help="where to write the page; .dvc/config's plots.html_template names .dvc/plots.html")
    a = ap.parse_args(argv)
    print(f"plots page: {write_page(a.output)} (Vega inlined; `dvc plots show` works offline)")


if __name__ == "__main__":
    main()
