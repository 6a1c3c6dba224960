"""The ``ctxai`` sub-commands, one module each; every module registers its own parser with ``add_parser(sub)``
and imports the wings it needs when its command runs, so that ``ctxai --help`` stays light."""
