#!/usr/bin/env bash
# Vendor the ipywidgets HTML manager, RequireJS and MathJax from the npm registry into book/_static/vendor/, so the
# widgets and the maths in the built book render when the HTML is opened offline (myst-nb and Sphinx would otherwise
# load them from CDNs).
# Usage: book/fetch_widget_js.sh [DEST]    (DEST defaults to book/_static/vendor; needs npm and the npm registry)
set -euo pipefail
HTML_MANAGER_VERSION="${HTML_MANAGER_VERSION:-1.0.15}"  # @jupyter-widgets/html-manager for ipywidgets 8.1
REQUIREJS_VERSION="${REQUIREJS_VERSION:-2.3.8}"
MATHJAX_VERSION="${MATHJAX_VERSION:-3.2.2}"  # Sphinx's default MathJax major version
dest="${1:-$(dirname "$0")/_static/vendor}"
command -v npm >/dev/null || { echo "fetch_widget_js.sh: npm is required (apt-get install -y npm)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@${HTML_MANAGER_VERSION}" "requirejs@${REQUIREJS_VERSION}" \
    "mathjax@${MATHJAX_VERSION}" >/dev/null)
mkdir -p "$tmp/hm" "$tmp/rq" "$tmp/mj"
tar -xzf "$tmp"/jupyter-widgets-html-manager-*.tgz -C "$tmp/hm"
tar -xzf "$tmp"/requirejs-*.tgz -C "$tmp/rq"
tar -xzf "$tmp"/mathjax-*.tgz -C "$tmp/mj"
rm -rf "$dest.partial"
mkdir -p "$dest.partial/html-manager"
# embed-amd.js loads its chunks and fonts from its own folder; source maps are not needed.
find "$tmp/hm/package/dist" -maxdepth 1 -type f ! -name '*.map' -exec cp {} "$dest.partial/html-manager/" \;
cp "$tmp/rq/package/require.js" "$dest.partial/require.js"
# MathJax: the combined TeX/MathML-to-HTML component plus what it loads lazily (extensions, fonts, menu); the other
# combined bundles and the speech-rule engine are not used.
mkdir -p "$dest.partial/mathjax"
cp "$tmp/mj/package/es5/tex-mml-chtml.js" "$dest.partial/mathjax/"
for d in a11y input output ui adaptors; do
    [ -d "$tmp/mj/package/es5/$d" ] && cp -r "$tmp/mj/package/es5/$d" "$dest.partial/mathjax/"
done
cp "$tmp/mj/package/LICENSE" "$dest.partial/mathjax/LICENSE" 2>/dev/null || true
cp "$tmp/hm/package/LICENSE" "$dest.partial/html-manager/LICENSE" 2>/dev/null || true
cp "$tmp/rq/package/LICENSE" "$dest.partial/require.LICENSE" 2>/dev/null || true
printf 'html-manager %s\nrequirejs %s\nmathjax %s\n' "$HTML_MANAGER_VERSION" "$REQUIREJS_VERSION" "$MATHJAX_VERSION" \
    > "$dest.partial/VERSIONS"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "vendored the widget JavaScript and MathJax into $dest"
