"""Constants of the rproxy integration."""

from __future__ import annotations

from typing import Final

from rproxy_core import const as _core
from rproxy_core.agent import discovery as _discovery

DOMAIN: Final = "rproxy"

CONF_BRIDGE_URL: Final = "bridge_url"
CONF_TUNNEL_NAME: Final = "tunnel_name"
CONF_TARGET: Final = "target"
CONF_TARGET_URL: Final = "target_url"
CONF_TARGET_NAME: Final = "target_name"

# Options.
CONF_REQUEST_TIMEOUT: Final = "request_timeout"
CONF_VISITOR_AUTH: Final = "visitor_auth"
CONF_VISITOR_USERNAME: Final = "visitor_username"
CONF_VISITOR_PASSWORD: Final = "visitor_password"
CONF_FORWARD_HEADERS: Final = "forward_headers"
#: More apps over the same tunnel, as ``NAME=URL`` lines (``rproxy agent --service``): web apps
#: (http:// or https://), visited as NAME.<tunnel>.<domain>, and TCP services (tcp://HOST:PORT).
CONF_SERVICES: Final = "services"
#: The address visitors open, where the bridge cannot know it (set by the user).
CONF_PUBLIC_URL: Final = "public_url"
#: Whether the tunnel is up; the switch entity flips it and it survives restarts.
CONF_EXPOSED: Final = "exposed"

#: What a tunnel exposes: this Home Assistant, or a web app at a URL (typed or discovered).
TARGET_HOMEASSISTANT: Final = "homeassistant"
TARGET_URL: Final = "url"

VISITOR_AUTH_NONE: Final = "none"
VISITOR_AUTH_BASIC: Final = "basic"

#: Where the Public URL sensor's address comes from (its ``source`` attribute).
PUBLIC_URL_FROM_BRIDGE: Final = "bridge"
PUBLIC_URL_FROM_OPTIONS: Final = "options"
#: The bridge named an address on this network (it was dialled there and has no domain):
#: visitors from the internet use another one, which nobody told it.
PUBLIC_URL_LOCAL_BRIDGE: Final = "local_bridge"
#: The bridge named something that is not an http(s) address.
PUBLIC_URL_INVALID: Final = "invalid"

#: The defaults of ``rproxy agent``, so a tunnel set up here behaves as one started by hand
#: (the form's number field takes whole seconds).
DEFAULT_REQUEST_TIMEOUT: Final = int(_core.REQUEST_TIMEOUT)
DEFAULT_TUNNEL_NAME: Final = _core.DEFAULT_TUNNEL_NAME

#: The project's own mDNS service type, and the TXT property that marks a plain
#: ``_http._tcp`` service as meant for rproxy: rproxy_core's, which the ``rproxy agent``
#: command uses too (manifest.json repeats the types, as Home Assistant reads them there).
ZEROCONF_TYPE: Final = _discovery.ZEROCONF_TYPE
ZEROCONF_HTTP_TYPE: Final = _discovery.ZEROCONF_HTTP_TYPE
ZEROCONF_MARKER: Final = _discovery.ZEROCONF_MARKER

#: Seconds setup waits for the first connection before telling Home Assistant to retry.
SETUP_TIMEOUT: Final = 15

#: Target URL recorded for Home Assistant itself; requests never leave the process.
HOMEASSISTANT_TARGET_URL: Final = "http://homeassistant.internal"
