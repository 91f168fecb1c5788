#!/bin/sh
# The UI test drives Debian's chromium through chromedriver (no browser can be downloaded from elsewhere).
# Install them when we can (root); otherwise the browser test skips itself with a loud message.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver for the browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "WARNING: could not install chromium; the browser test will be skipped" >&2
else
  echo "WARNING: chromium/chromedriver missing and not root: the browser test will be skipped" >&2
fi
exit 0
