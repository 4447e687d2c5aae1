"""Cluster mode: many signal_srv processes share their calls through Redis (option ``redis_url``).

The only package that imports ``redis``. It implements the ``Placement`` seam: one owner
per call, recorded with a fencing epoch (``directory``), node leases and the cluster-wide
index (``directory``, Lua in ``lua/``), and the bridge that carries a call's requests and
frames between the node a client reached and the node that owns the call (``bridge``).
Nothing here decides a call's rules: that stays with the owner's actor.
"""

from signal_srv.cluster.placement import ClusterPlacement

__all__ = ["ClusterPlacement"]
