"""Scale-out: request routing across engine replicas, the simulator that replays a
trace through the same policies, and the Ray Serve application.

``chain``, ``routing`` and ``simulate`` are torch-free (the layering test checks it):
the ingress and the simulator compute chain digests with ``kv/`` code only.
"""
