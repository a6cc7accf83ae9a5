"""The OpenAI-compatible router: one endpoint for every model, each request routed by its
`model` to that service's own socket (see lmproxy/router/ROUTER.md).

`OpenAiApi.ListenPort` gets a socket unit and this service, socket-activated: no process
until the first request. Run by its unit as
`python3 -P -m lmproxy.router --user|--system --config PATH`; SIGHUP (systemctl reload,
which `lmproxy install` does) reads the installed config again without dropping requests
in flight.
"""
