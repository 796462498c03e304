"""The coordinator's read-only web dashboard: ``views`` (JSON from the store), ``app`` (the
Starlette routes and event stream), ``server`` (uvicorn inside the coordinator process)."""
