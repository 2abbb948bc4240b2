"""Generated from the protos yandexcloud ships: make yandex-proto."""
