"""One migration, from both sides: what migsecd runs for it, below its asyncio servers.

``source`` (A's VMM agent, a worker thread) and ``destination`` (B's incoming migration)
run a cold move over ``link`` (the handshake), ``dataplane`` (the streams, through
``migsec.transfer``) and ``channel`` (control messages); ``live`` runs a live one over
``bridge``; ``journal`` is the durable record each side writes (``jobs`` holds its
helpers, the abort switch and progress), ``recovery`` finishes what a crash interrupted,
``release`` disposes of the source's copy after the commit, ``peers`` finds a peer by its
address. ``migsec.daemon`` holds the servers that start them (``daemon.endpoint``: B's handshake on
the event loop, then ``destination`` or ``recovery`` in a worker thread) and the wiring
(``daemon.services``). Nothing here imports ``migsec.daemon`` or asyncio at run time.
"""
