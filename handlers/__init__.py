"""Bot logic. Each module exposes `router = Router(...)`; config chooses one per tenant."""
