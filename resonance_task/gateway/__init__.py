"""Both ends of the PushService contract: our client to gateways, and a simulated gateway."""
