"""AI Gateways: a configured assistant behind one model id."""
