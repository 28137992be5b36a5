"""The distributed layer: configuration and process groups (``parallel_state``) and the collectives
and ring transfers built on them (``comm``). Knows nothing of plans or attention."""
