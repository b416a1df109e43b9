"""Backends: what a request is started on (client-managed Qlik Sense through QRS, Qlik Cloud)."""
