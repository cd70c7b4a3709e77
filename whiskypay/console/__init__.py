"""The operator console: server-rendered pages for queues, merchants, payments and dead letters (issue 13).

`whiskypay.console.app.Console` is the WSGI app, `whiskypay.console.data` what its pages read. The templates and the
stylesheet ship inside this package (no JavaScript, no build step). `whiskypay.dashboard.build_app` puts it behind
basic auth, the CSRF check and page scrubbing, next to dramatiq-dashboard at /dramatiq/.
"""
