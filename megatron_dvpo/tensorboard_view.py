"""A TensorBoard plugin that opens a run's view with every chart scaled to its full range.

TensorBoard's Time Series starts with "Ignore outliers in chart scaling" ticked: each chart is
scaled to its values' 5th-95th percentile, which leaves out at least the lowest and highest
point, so a curve that rises fast starts below its card. The setting lives in the browser's
localStorage and no URL parameter sets it, but a page served by TensorBoard itself may write
it. This plugin serves that page: ``<tensorboard>/data/plugin/dvpo/view?<query>`` unticks the
setting (keeping the user's others) and goes on to Time Series with the same query, so a run's
printed link (``logging.Dashboard.link``) opens on full-range curves. The plugin is
experimental to TensorBoard, so it has no tab; it is installed with this package
(``pyproject.toml``'s ``tensorboard_plugins`` entry point).
"""

from __future__ import annotations

import base64
import hashlib

from tensorboard.backend import experimental_plugin, http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

PLUGIN_NAME = "dvpo"
_ROUTE = "/view"
VIEW_PATH = f"/data/plugin/{PLUGIN_NAME}{_ROUTE}"  # under TensorBoard's root (and --path_prefix)

# the key and field TensorBoard 2.x's frontend keeps its settings under; up to the root is
# relative, so a --path_prefix is kept
_SCRIPT = """
const key = "_tb_global_settings";
let settings = {};
try { settings = JSON.parse(window.localStorage.getItem(key)) || {}; } catch (e) {}
settings.ignoreOutliers = false;
window.localStorage.setItem(key, JSON.stringify(settings));
window.location.replace("../../../" + window.location.search + "#timeseries");
"""
_PAGE = f"<!doctype html><title>TensorBoard</title><script>{_SCRIPT}</script>"
_SCRIPT_SHA256 = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()


class RunViewPlugin(base_plugin.TBPlugin, experimental_plugin.ExperimentalPlugin):
    plugin_name = PLUGIN_NAME

    def get_plugin_apps(self):
        return {_ROUTE: self._serve_view}

    def is_active(self) -> bool:
        return False

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata()

    @wrappers.Request.application
    def _serve_view(self, request):
        return http_util.Respond(request, _PAGE, "text/html",
                                 csp_scripts_sha256s=[_SCRIPT_SHA256])
