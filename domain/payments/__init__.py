"""Wallet top-ups through Khalti (ePayment), eSewa (ePay v2) and Stripe (PaymentIntents + webhooks).

`service` is the API the routers call; `khalti`, `esewa` and `stripe` are the gateway clients, each
speaking its gateway's documented protocol over httpx; `settle` is where money moves, once per intent.
"""
