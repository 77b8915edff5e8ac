#!/usr/bin/env bash
# Open pages of the built book in a real browser with the network off, as a reader would, and check what it shows:
# typeset formulas (MathJax's SVG output, no raw $...$ TeX left in the text) and, on a lesson page, the figures
# (img elements whose data is in the page). Prints what it found per page; exits 1 when a page fails, 2 when it
# cannot run.
#
#   scripts/book_browser_check.sh BOOK_DIR [PAGE.html ...]     # default pages: 02_selection.html 05_evaluation.html
#
# Build the book first (python -m tsq_utils.lessons.book --profile ci --out BOOK_DIR). The browser is Debian's
# headless Chromium: apt-get install -y --no-install-recommends chromium-headless-shell (or chromium); set
# TSQ_CHROMIUM to use another binary. The network is cut twice: the browser runs in a network namespace of its own
# when `unshare -rn` is allowed here, and it always gets a proxy that does not exist and a resolver that finds no host.
set -uo pipefail

book="${1:?usage: scripts/book_browser_check.sh BOOK_DIR [PAGE.html ...]}"
shift
pages=("$@")
[[ ${#pages[@]} -gt 0 ]] || pages=(02_selection.html 05_evaluation.html)
book="$(cd "$book" 2>/dev/null && pwd)" || { echo "book_browser_check: no folder $1" >&2; exit 2; }

browser="${TSQ_CHROMIUM:-}"
if [[ -z "$browser" ]]; then
    for b in chromium-headless-shell chromium chromium-browser; do
        if command -v "$b" >/dev/null; then browser="$(command -v "$b")"; break; fi
    done
fi
if [[ -z "$browser" ]]; then
    echo "book_browser_check: no chromium (apt-get install -y chromium-headless-shell)" >&2
    exit 2
fi
py="${TSQ_PYTHON:-python3}"
isolate=()
if unshare -rn true 2>/dev/null; then isolate=(unshare -rn); fi
netnote="proxy 127.0.0.1:9 and no DNS"
[[ ${#isolate[@]} -gt 0 ]] && netnote="own network namespace (no interfaces up), $netnote"
echo "book_browser_check: $("$browser" --version 2>/dev/null | head -1) on $book; network off: $netnote"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for page in "${pages[@]}"; do
    if [[ ! -f "$book/$page" ]]; then echo "  $page: FAIL (no such page)"; status=1; continue; fi
    # --virtual-time-budget lets the page's scripts (MathJax) finish before the DOM is dumped
    if ! timeout 120 "${isolate[@]}" "$browser" --headless --no-sandbox --disable-gpu --no-first-run \
        --proxy-server=127.0.0.1:9 --host-resolver-rules="MAP * ~NOTFOUND" --user-data-dir="$tmp/profile" \
        --virtual-time-budget=30000 --dump-dom "file://$book/$page" >"$tmp/dom.html" 2>"$tmp/err.log"; then
        echo "  $page: FAIL (the browser did not finish; $(tail -1 "$tmp/err.log"))"; status=1; continue
    fi
    "$py" - "$tmp/dom.html" "$page" <<'PY' || status=1
import re, sys
dom, page = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
# MathJax 3's output: an <mjx-container jax="SVG"> holding the formula drawn as an <svg>
typeset = re.findall(r'<mjx-container\b([^>]*\bjax="SVG"[^>]*)>\s*<svg\b', dom)
svg, display = len(typeset), sum('display="true"' in attrs for attrs in typeset)
errors = len(re.findall(r"<mjx-merror\b|data-mjx-error=", dom))
# the text a reader sees (scripts, styles and code blocks removed): TeX that MathJax did not typeset stays there
text = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", dom, flags=re.S | re.I)
text = re.sub(r"<[^>]+>", " ", text)
raw = re.findall(r"\$\$.+?\$\$|\$[^$\n]{1,200}?\$", text)
imgs = re.findall(r"<img\b[^>]*>", dom)
figures = [i for i in imgs if re.search(r'src="data:image/(png|jpeg|svg\+xml);base64,[A-Za-z0-9+/]{20}', i)]
external = re.findall(r'<(?:script|img|link)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"', dom)
lesson = re.match(r"\d\d_", page) is not None  # a lesson page has figures; the docs pages have none
ok = svg > 0 and not raw and not errors and not external and len(figures) == len(imgs) and (figures or not lesson)
print(f"  {page}: {'ok' if ok else 'FAIL'}: {svg} formulas typeset by MathJax as SVG ({display} displayed), "
      f"{len(raw)} raw TeX left{' e.g. ' + repr(raw[0][:60]) if raw else ''}, {errors} TeX errors, "
      f"{len(figures)} of {len(imgs)} img elements carry their figure's data, {len(external)} external resources")
# absolute paths the run printed (a notebook's output, not the book's doing): reported, not failed on here
shown = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I))
paths = re.findall(r"(?<![\w.:/])/(?:home|root|tmp|work|usr|opt|mnt|Users|var)/[\w.\-/]+", shown)
if paths:
    print(f"    note: {len(paths)} absolute path(s) in the page's text, e.g. {paths[0]}")
sys.exit(0 if ok else 1)
PY
done
exit $status
