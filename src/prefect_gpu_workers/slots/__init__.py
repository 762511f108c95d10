"""The slot authority: who holds a worker's GPU slots, and how they pass on.

One Prefect global concurrency limit per worker is the record and the guard;
the worker's slot broker hands its slots to the worker's GPU steps over a Unix
socket, FIFO and in milliseconds, holding a Prefect lease for every grant.

| module | what it is |
|---|---|
| ``wire`` | stdlib, pure: the socket's messages (one JSON object per line) |
| ``grants`` | stdlib, pure: who gets a slot next and on which GPU, who may ask, intake |
| ``leases`` | stdlib, pure: a lease as the broker knows it; how its slots go back |
| ``metrics`` | stdlib: the broker's Prometheus text, bounded histograms |
| ``prefect_io`` | the broker's Prefect calls, each once and bounded |
| ``holders`` | a step's request as the broker holds it: ``Phase`` and ``LeaseHold`` |
| ``give_back`` | ``GiveBacks``: a finished holder's slots back to Prefect, whatever it answers |
| ``upkeep`` | ``Upkeep``: limits re-read, holders of a recreated limit re-counted, renewals |
| ``broker`` | ``SlotBroker``: sessions (one connection per step), dispatch, lease passing |
| ``client`` | the step's side: ``gpu_slot`` / ``agpu_slot``, the ``GpuGrant`` they yield |
"""
