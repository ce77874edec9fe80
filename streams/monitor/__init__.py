"""Operations: what operators watch while the workers run.

collector   one snapshot every interval: lag per partition, rates, latency, models
status      a partition's status from its recent offsets (Burrow's rules)
tail        the output topics read back: latency, model versions, dead-letter reasons
exposition  the snapshot as Prometheus metrics, in kafka_exporter's names
server      `interest monitor`: the page, /api/status, /metrics
terminal    `interest lag --watch`: the same snapshot in a terminal
"""
