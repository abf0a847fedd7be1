"""``include("hato.contrib.django.urls")``: the webhook view at the included prefix."""

from __future__ import annotations

from django.urls import path

from hato.contrib.django import views

app_name = "hato"
urlpatterns = [path("", views.webhook, name="webhook")]
