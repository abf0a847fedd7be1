from django.urls import include, path

from signup import views

urlpatterns = [
    path("signup/", views.signup),
    path("hato/webhooks/", include("hato.contrib.django.urls")),
]
