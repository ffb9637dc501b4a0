#!/usr/bin/env bash
# Rebuild pgprune/assets/dvc_plots_template.html: an HTML template for `dvc plots show --html-template` with
# vega, vega-lite and vega-embed inlined, so that the plots page renders offline (DVC's default page loads
# them from a CDN). Needs `npm` (registry access); the packages are unpacked in a temporary folder only.
# Usage: bash scripts/build_plots_template.sh [vega-version vega-lite-version vega-embed-version]
set -euo pipefail
cd "$(dirname "$0")/.."
VEGA="${1:-5.33.1}" VEGA_LITE="${2:-5.23.0}" VEGA_EMBED="${3:-6.29.0}"
PY="${PGPRUNE_VENV:-.venv}/bin/python"; [ -x "$PY" ] || PY=python3
OUT="$PWD/pgprune/assets/dvc_plots_template.html"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "vega@$VEGA" "vega-lite@$VEGA_LITE" "vega-embed@$VEGA_EMBED" >/dev/null \
  && for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}" --strip-components=1; done)
"$PY" - "$tmp" "$OUT" "$VEGA" "$VEGA_LITE" "$VEGA_EMBED" <<'PYEOF'
import sys
from pathlib import Path

tmp, out, vega, vl, embed = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
libs = [(f"vega-{vega}", "vega.min.js"), (f"vega-lite-{vl}", "vega-lite.min.js"),
        (f"vega-embed-{embed}", "vega-embed.min.js")]
parts = ["<!DOCTYPE html>", "<html>", "<head>", '<meta charset="utf-8">', "<title>pgprune: DVC plots</title>",
         f"<!-- offline template for `dvc plots show --html-template`; inlined from npm: vega@{vega}, "
         f"vega-lite@{vl}, vega-embed@{embed} (all BSD-3-Clause, (c) the Vega project / University of "
         "Washington Interactive Data Lab). Rebuild with scripts/build_plots_template.sh -->",
         "<style>body{font-family:sans-serif;margin:1em} table{border-spacing:15px} img{max-width:100%}</style>"]
for folder, name in libs:
    js = (tmp / folder / "build" / name).read_text(encoding="utf-8")
    for ph in ("{plot_divs}", "{scripts}", "{refresh_tag}"):  # dvc-render replaces these anywhere in the page
        assert ph not in js, (name, ph)
    parts.append(f"<script>/* {folder} */\n" + js.replace("</script>", "<\\/script>") + "\n</script>")
parts += ["</head>", "<body>", "{plot_divs}", "</body>", "</html>", ""]
html = "\n".join(parts)
assert "https://cdn" not in html
out.write_text(html, encoding="utf-8")
print(f"wrote {out.name}: {len(html.encode()) // 1024} KB")
PYEOF
