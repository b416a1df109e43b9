"""The MQTT edge: the listener (session, acks, status), response-topic rules, the requester client."""
