"""What a user's code calls: the coordinator client (``client.py``: ``Client``, ``AsyncClient``,
``job_spec``, ``ConfideError``) and the data owner's side of private inference
(``private_inference.py``: ``private_infer``). The top package re-exports the client."""
