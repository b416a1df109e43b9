"""The REST API (contract section 5): Butler's start-task endpoint on the shared StartService.

* `server`  runs uvicorn in a background thread for the daemon (`start_http`).
* `app`     the FastAPI application (`create_app`): routes, auth, limits, error mapping.
* `butler`  Butler's array body and response shape, converted to and from the one pipeline.
* `schemas` response models and the OpenAPI document's request-body schemas.
* `tls`     HTTPS and mutual TLS for the listener, and warnings about an exposed one.
"""
