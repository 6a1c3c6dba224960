"""``ctxai batch``: explain the regions a policy picks over many scans, on a local process pool or on Ray."""
