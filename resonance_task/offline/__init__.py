"""Offline push: users who were not pushed online reach their devices through FCM, APNs
or a webhook, from the offline-pushes topic, in a consumer group of its own."""
